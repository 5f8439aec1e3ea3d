"""A userspace TCP relay that makes a path slow, narrow or flaky, for fault tests and benchmarks.

The kernel here has no ``netem``, so latency and connection loss between two hosts of a test lab
(:mod:`transfer.netns`) come from this relay placed on the path: clients dial the relay, the
relay dials ``target`` and forwards both directions through three impairments:

* **Delay** - each direction is a real delay line: a chunk read at ``t`` is written at
  ``t + delay``, in order, while later chunks keep being read. A round trip costs ``2 * delay``
  but a bulk stream still flows at full rate (unlike a sleep per read, which would also cap
  throughput at one read per delay).
* **Throttle** - ``rate`` bytes/s per direction, one token bucket shared by all connections of
  that direction, like the capacity of a link.
* **Resets** - a connection is reset (``SO_LINGER`` 0 then close: both ends get an RST, no
  FIN) at a point chosen when it is accepted. Two knobs, both drawn from ``seed``:
  ``reset_fraction`` dooms that share of connections, each at a uniformly random byte count
  below ``reset_window`` (a doomed connection that closes sooner escapes);
  ``reset_per_mib`` is a hazard per MiB relayed (exponential reset point), which also reaches
  the long-lived, few connections of a transfer engine. A connection resets at whichever point
  comes first.

Memory is bounded: each direction buffers at most ``max_buffer`` bytes (the reader waits for
the writer beyond that) and at most ``max_connections`` are relayed at once (more are closed at
accept). Counters (:class:`RelayStats`) are read in process, or from the CLI, which prints them
as one JSON line on SIGUSR1 and on SIGTERM/SIGINT before exiting::

    python -m transfer.relay --listen 10.0.0.2:9000 --target 10.0.0.3:7000 \\
        --delay-ms 50 --reset-fraction 0.01 --seed 1
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Relay", "RelayStats", "TokenBucket", "main", "parse_hostport"]

_READ = 64 << 10
_MIB = 1 << 20


class TokenBucket:
    """Paces a byte stream to ``rate`` bytes/s with bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float, burst: int = 256 << 10) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._burst = burst / rate
        self._free_at = time.monotonic()

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit the rate (callers are served in call order)."""
        now = time.monotonic()
        start = max(self._free_at, now - self._burst)
        self._free_at = start + n / self.rate
        wait = self._free_at - self._burst - now
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class RelayStats:
    """What the relay did so far; ``active`` is connections open now."""

    connections: int = 0
    active: int = 0
    resets: int = 0
    refused: int = 0  # target unreachable or over max_connections: closed at once
    bytes_to_target: int = 0
    bytes_to_client: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Reset(Exception):
    """This connection reached its reset point."""


class _Connection:
    """One relayed connection: two delay lines and a shared reset point."""

    def __init__(self, relay: Relay, reset_at: float) -> None:
        self.relay = relay
        self.reset_at = reset_at
        self.moved = 0

    def count(self, n: int) -> None:
        self.moved += n
        if self.moved >= self.reset_at:
            raise _Reset

    async def pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                   bucket: TokenBucket | None, to_target: bool) -> None:
        """Read from ``src`` into a bounded delay line; a writer task drains it into ``dst``."""
        relay = self.relay
        line: collections.deque[tuple[float, bytes | None]] = collections.deque()
        room = asyncio.Condition()
        buffered = 0
        ready = asyncio.Event()

        async def writer() -> None:
            nonlocal buffered
            while True:
                while not line:
                    ready.clear()
                    await ready.wait()
                due, data = line.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if dst.can_write_eof():
                        dst.write_eof()  # half-close, as the sender did
                    return
                if bucket is not None:
                    await bucket.take(len(data))
                self.count(len(data))
                dst.write(data)
                await dst.drain()
                if to_target:
                    relay.stats.bytes_to_target += len(data)
                else:
                    relay.stats.bytes_to_client += len(data)
                async with room:
                    buffered -= len(data)
                    room.notify_all()

        async def reader() -> None:
            nonlocal buffered
            while True:
                data = await src.read(_READ)
                async with room:
                    await room.wait_for(
                        lambda: buffered == 0 or buffered + len(data) <= relay.max_buffer)
                    buffered += len(data)
                line.append((time.monotonic() + relay.delay, data or None))
                ready.set()
                if not data:
                    return

        tasks = [asyncio.ensure_future(reader()), asyncio.ensure_future(writer())]
        try:
            # Done when the writer delivered EOF, or at once if either side fails (a reset, a
            # broken socket): a dead writer must not leave the reader waiting for room.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
            await tasks[1]
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t


class Relay:
    """Forwards connections on ``listen`` to ``target`` with delay, throttle and resets.

    Use ``async with Relay(...) as relay`` (or :meth:`start`/:meth:`close`); :attr:`address` is
    where it listens (port 0 picks one). ``rate`` caps each direction, ``rate_to_client`` the
    target's replies only (a peer's upload); ``burst`` is the bytes either cap lets through at
    once.
    """

    def __init__(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0),
                 delay: float = 0.0, rate: float | None = None,
                 rate_to_client: float | None = None, reset_fraction: float = 0.0,
                 reset_window: int = 64 << 10, reset_per_mib: float = 0.0,
                 seed: int | None = None, max_buffer: int = 4 << 20,
                 max_connections: int = 1024, connect_timeout: float = 5.0,
                 burst: int = 256 << 10) -> None:
        if delay < 0 or not math.isfinite(delay):
            raise ValueError("delay must be a finite number of seconds >= 0")
        if not 0.0 <= reset_fraction <= 1.0:
            raise ValueError("reset_fraction must be within [0, 1]")
        if reset_window < 1 or reset_per_mib < 0 or max_buffer < 1 or max_connections < 1:
            raise ValueError("reset_window, max_buffer and max_connections must be positive, "
                             "reset_per_mib >= 0")
        self.target = target
        self.listen = listen
        self.delay = delay
        self.reset_fraction = reset_fraction
        self.reset_window = reset_window
        self.reset_per_mib = reset_per_mib
        self.max_buffer = max_buffer
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        up_rate = rate
        down_rate = rate_to_client if rate_to_client is not None else rate
        self._to_target = TokenBucket(up_rate, burst) if up_rate else None
        self._to_client = TokenBucket(down_rate, burst) if down_rate else None
        self._rng = random.Random(seed)
        self.stats = RelayStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the relay accepts on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("relay not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, *self.listen, backlog=256)
        return self

    async def close(self) -> None:
        """Stop accepting and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _reset_point(self) -> float:
        point = math.inf
        if self.reset_fraction and self._rng.random() < self.reset_fraction:
            point = self._rng.randrange(self.reset_window)
        if self.reset_per_mib:
            point = min(point, self._rng.expovariate(self.reset_per_mib) * _MIB)
        return point

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        stats = self.stats
        if stats.active >= self.max_connections:
            stats.refused += 1
            writer.transport.abort()
            return
        self._tasks.add(task)
        stats.connections += 1
        stats.active += 1
        up_w: asyncio.StreamWriter | None = None
        conn = _Connection(self, self._reset_point())
        try:
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target),
                                                    self.connect_timeout)
            except (OSError, TimeoutError):
                stats.refused += 1  # the client sees its connection closed
                return
            # 0 bytes: a doomed connection may be reset before anything crossed it.
            conn.count(0)
            pumps = [asyncio.ensure_future(conn.pump(reader, up_w, self._to_target, True)),
                     asyncio.ensure_future(conn.pump(up_r, writer, self._to_client, False))]
            try:
                await asyncio.gather(*pumps)
            finally:
                for p in pumps:
                    p.cancel()
                for p in pumps:
                    with contextlib.suppress(BaseException):
                        await p
        except _Reset:
            stats.resets += 1
            _abort_with_rst(writer)
            if up_w is not None:
                _abort_with_rst(up_w)
        except asyncio.CancelledError:
            # close(): cut both sides. Not re-raised: asyncio's stream server logs a handler
            # task that ends cancelled as an error.
            _abort_with_rst(writer)
            if up_w is not None:
                _abort_with_rst(up_w)
        except (OSError, asyncio.IncompleteReadError):
            # One side broke: make the other see it as abruptly, not as a clean end.
            _abort_with_rst(writer)
            if up_w is not None:
                _abort_with_rst(up_w)
        finally:
            stats.active -= 1
            writer.close()
            if up_w is not None:
                up_w.close()
            self._tasks.discard(task)


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> ``(host, port)``; ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transfer.relay",
        description="TCP relay adding delay, a rate cap and connection resets to a path.")
    p.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT",
                   help="address to accept on (port 0: any free port)")
    p.add_argument("--target", type=_hostport, required=True, metavar="HOST:PORT",
                   help="address every connection is forwarded to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    p.add_argument("--rate", type=float, default=None, metavar="BYTES/S",
                   help="cap per direction, shared by all connections (default: none)")
    p.add_argument("--rate-to-client", type=float, default=None, metavar="BYTES/S",
                   help="cap of the target-to-client direction only (default: --rate)")
    p.add_argument("--reset-fraction", type=float, default=0.0,
                   help="share of connections reset within their first --reset-window bytes")
    p.add_argument("--reset-window", type=int, default=64 << 10, metavar="BYTES")
    p.add_argument("--reset-per-mib", type=float, default=0.0,
                   help="chance of a reset per MiB relayed (exponential reset point)")
    p.add_argument("--seed", type=int, default=None, help="seed of the reset draws")
    p.add_argument("--max-buffer", type=int, default=4 << 20, metavar="BYTES",
                   help="bytes buffered per direction of a connection")
    return p


async def _run(args: argparse.Namespace) -> dict[str, int]:
    relay = Relay(args.target, listen=args.listen, delay=args.delay_ms / 1000.0,
                  rate=args.rate, rate_to_client=args.rate_to_client,
                  reset_fraction=args.reset_fraction, reset_window=args.reset_window,
                  reset_per_mib=args.reset_per_mib, seed=args.seed, max_buffer=args.max_buffer)
    await relay.start()
    host, port = relay.address
    print(f"relay listening on {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def report() -> None:
        print(json.dumps(relay.stats.as_dict()), flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, report)
    await stop.wait()
    await relay.close()
    return relay.stats.as_dict()


def main(argv: Sequence[str] | None = None) -> int:
    """Relay until SIGTERM/SIGINT, then print the counters as JSON; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        final: dict[str, Any] = asyncio.run(_run(args))
    except (OSError, ValueError) as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
