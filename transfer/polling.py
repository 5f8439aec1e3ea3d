"""Polling for a reply before sleeping on it (``transfer.busy_poll_us``).

Why: a thread that sleeps on a reply is woken by the kernel when it comes; on a virtual machine
whose other CPU is idle that wake-up costs tens of microseconds, about as much as a loopback round
trip itself (master calls measured ~85-100 us sleeping, ~30-60 us polling here). A caller that
waits on its own thread only briefly, for a small reply, does better to ask again and again (a
non-blocking receive, the GIL released in each) until the reply is there. Used by the blocking
RPC client, by the TCP data plane's caller-thread exchanges and by its server; a sender whose
socket buffer is full does the same (:func:`poll_send`).

Polling takes a core, so it is done only while the host has one to spare (:func:`spare_core`):
with more runnable threads than cores, the spinning thread would take the time of the very
processes it waits for. Four clients putting 1 MiB values into one store node on this 2-core host
moved 3.8 GB/s without polling and 2.6 GB/s with every wait polling; one client alone moved 2.2
without and 3.1 with it.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

__all__ = ["poll_recv_exact", "poll_recv_into", "poll_send", "spare_core", "usable_cores"]

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota.

    Why not ``os.cpu_count()``: in a container it reports the host's cores, while the container
    may be pinned to a few (``--cpuset-cpus``) or given a quota (``--cpus``, a Kubernetes
    limit). Polling and splitting work over streams judged by the host's count would spend a
    quota of two cores as if there were sixty-four."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


_CORES = usable_cores()
_SAMPLE_EVERY = 0.005
_WEIGHT = 0.2  # of each new reading in the running average: it spans ~25 ms of readings
_sample = [0.0, 0.0]  # when the next reading is due, the running average of other runnables


def spare_core() -> bool:
    """Whether the host has a core for a polling thread: on average over the last ~25 ms,
    fewer runnable threads besides the caller than cores less half a core, from
    ``/proc/loadavg`` read at most every 5 ms (a read per wait would cost more than it saves).
    The average rides out the moment another thread is woken (a single reading caught one
    client's own master call often enough to stop its polling a fifth of the time); four
    busy clients on two cores keep it well above. True where the kernel does not say."""
    now = time.perf_counter()
    if now >= _sample[0]:
        _sample[0] = now + _SAMPLE_EVERY
        running = _runnable()
        if running is None:
            return True
        _sample[1] += _WEIGHT * ((running - 1) - _sample[1])  # the caller is one of them
    return _sample[1] < _CORES - 0.5


def _runnable() -> int | None:
    """Threads running or ready to run on the host now (``/proc/loadavg``), None if unknown."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


def poll_recv_into(sock: socket.socket, view: memoryview, seconds: float) -> int | None:
    """Receive into ``view`` without sleeping, asking until bytes come or ``seconds`` pass.

    Returns the bytes received (0: the peer closed), or ``None`` if nothing came in time.
    ``sock`` must not wait inside a receive on its own: a blocking socket (each receive here is
    ``MSG_DONTWAIT``) or one whose Python timeout is 0 - never one with a positive timeout,
    which Python turns into a ``poll`` that sleeps.
    """
    clock = time.perf_counter
    end = clock() + seconds
    while True:
        try:
            return sock.recv_into(view, len(view), _DONTWAIT)
        except BlockingIOError:
            if clock() >= end or not spare_core():
                return None


def poll_recv_exact(sock: socket.socket, view: memoryview, idle_seconds: float,
                    stop: Callable[[], bool] | None = None) -> int:
    """Fill as much of ``view`` as arrives without sleeping, giving up once ``idle_seconds``
    pass with no new byte, or as soon as ``stop()`` says so while it waits; returns how many
    bytes it received (the caller receives the rest the blocking way). Same socket rules as
    :func:`poll_recv_into`; a closed peer raises ``ConnectionError``.

    Why a whole payload and not just its first bytes: a receiver that sleeps while a large
    payload streams in is woken again and again as segments land; one that keeps asking is
    never put to sleep (1 MiB over loopback: ~280 -> ~215 us here, bare sockets).
    """
    clock = time.perf_counter
    got, want = 0, len(view)
    end = clock() + idle_seconds
    while got < want:
        try:
            n = sock.recv_into(view[got:], want - got, _DONTWAIT)
        except BlockingIOError:
            if clock() >= end or (stop is not None and stop()) or not spare_core():
                break
            continue
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n
        end = clock() + idle_seconds
    return got


def poll_send(sock: socket.socket, view: memoryview, idle_seconds: float) -> int:
    """Send as much of ``view`` as the socket takes without sleeping, giving up once
    ``idle_seconds`` pass with the send buffer still full; returns how many bytes went (the
    caller sends the rest the blocking way). Same socket rules as :func:`poll_recv_into`.

    Why: a large payload fills the send buffer, and a blocked sender is woken each time the
    peer's acknowledgements free some of it; one that keeps offering bytes is never put to sleep
    (16 MiB over loopback: ~4.5 -> ~4.0 ms here, bare sockets).
    """
    clock = time.perf_counter
    sent, want = 0, len(view)
    end = clock() + idle_seconds
    while sent < want:
        try:
            sent += sock.send(view[sent:], _DONTWAIT)
        except BlockingIOError:
            if clock() >= end or not spare_core():
                break
            continue
        end = clock() + idle_seconds
    return sent
