"""The engines behind the proxy: who they are, whether they are alive, what they serve.

Why a pool of its own: routing (the Conductor) only knows instance ids; this module owns the
HTTP side of an instance (URL, health, served models, in-flight count) and tells the Conductor
when an instance leaves or returns, so a dead engine stops receiving traffic within one health
interval and comes back by itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp

from scheduler.proxy.upstream import abort_waits

__all__ = ["Instance", "InstancePool", "InstanceSpec", "parse_instance", "load_instances"]

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class InstanceSpec:
    """How an engine is described on the command line, in a config file or in etcd.

    ``namespace`` is the key namespace of its KV cache (model, dtype, layout, block size, TP) as
    :class:`store.keys.KeyNamespace` fields; instances with different namespaces never share KV.
    """

    url: str
    role: str = "mixed"
    id: str = ""
    namespace: dict[str, Any] = field(default_factory=dict)
    store_segment: str = ""
    """The store segment next to this engine (its local store node's): where hot-spot
    replication puts a copy of a prefix it is about to load. Empty: never replicate to it."""

    def __post_init__(self) -> None:
        if not isinstance(self.store_segment, str) or len(self.store_segment) > 256:
            raise ValueError(f"instance {self.url}: store_segment must be a string of at most "
                             "256 characters")
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"instance url {self.url!r}: expected http(s)://host:port")
        if self.role not in ROLES:
            raise ValueError(f"instance {self.url}: role {self.role!r} not in {ROLES}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if not self.id:
            object.__setattr__(self, "id", f"{self.role}@{parsed.netloc}")


def parse_instance(text: str, default_role: str = "mixed") -> InstanceSpec:
    """``[role=]http://host:port`` from the command line, e.g. ``prefill=http://10.0.0.1:8100``."""
    role, sep, url = text.partition("=")
    if not sep:
        role, url = default_role, text
    return InstanceSpec(url=url.strip(), role=role.strip())


def load_instances(path: str | Path) -> list[InstanceSpec]:
    """Instances from a JSON file: ``[{"url": ..., "role": ..., "id": ..., "namespace": {...},
    "store_segment": ...}]``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"instances file {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("instances")
    if not isinstance(data, list):
        raise ValueError(f"instances file {path}: expected a list of instances")
    specs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "url" not in item:
            raise ValueError(f"instances file {path}: entry {i} needs at least a 'url'")
        unknown = set(item) - {"url", "role", "id", "namespace", "store_segment"}
        if unknown:
            raise ValueError(f"instances file {path}: entry {i} has unknown keys {sorted(unknown)}")
        specs.append(InstanceSpec(**item))
    return specs


@dataclass
class Instance:
    """Live state of one engine, as the proxy sees it."""

    spec: InstanceSpec
    healthy: bool = False
    models: tuple[str, ...] = ()
    in_flight: int = 0
    failures: int = 0
    last_check: float = 0.0
    namespace: dict[str, Any] = field(default_factory=dict)
    """The key namespace its connector uses: from the spec, etcd, or its first P/D answer."""
    waits: set[asyncio.Timeout] = field(default_factory=set, repr=False, compare=False)
    """Requests waiting for this engine's first byte (their deadlines): ended at once when it
    is taken out, so they go elsewhere instead of waiting out their timeout on a dead host."""

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def store_segment(self) -> str:
        return self.spec.store_segment


class InstancePool:
    """Health-checked instances. ``on_change(instance)`` fires when one goes up or down."""

    def __init__(self, specs: Iterable[InstanceSpec], *, interval: float = 2.0,
                 timeout: float = 2.0, timeouts_before_down: int = 3,
                 on_change: Callable[[Instance], None] | None = None) -> None:
        self._instances: dict[str, Instance] = {}
        for spec in specs:
            if spec.id in self._instances:
                raise ValueError(f"duplicate instance id {spec.id!r}")
            self._instances[spec.id] = Instance(spec)
        self.interval = interval
        self.timeout = timeout
        self.timeouts_before_down = timeouts_before_down
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._instances.values()))

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def healthy(self, *roles: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.healthy and (not roles or i.role in roles)]

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for inst in self.healthy():
            for m in inst.models:
                seen.setdefault(m)
        return list(seen)

    @property
    def started(self) -> bool:
        return self._session is not None

    def add(self, spec: InstanceSpec) -> Instance:
        """Add (or replace) an instance at run time, e.g. discovered from etcd."""
        inst = self._instances.get(spec.id)
        if inst is None or inst.spec != spec:
            if inst is not None and inst.healthy:  # replaced (new URL): out until probed
                self.remove(spec.id)
            inst = Instance(spec)
            self._instances[spec.id] = inst
        return inst

    def remove(self, instance_id: str) -> None:
        inst = self._instances.pop(instance_id, None)
        if inst is not None and inst.healthy:
            inst.healthy = False
            self._changed(inst)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="instance-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check round failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in list(self._instances.values())))

    async def check(self, inst: Instance) -> bool:
        """One health probe: ``/health`` answers 200, then ``/v1/models`` names what it serves."""
        assert self._session is not None, "pool not started"
        ok = timed_out = False
        try:
            async with self._session.get(f"{inst.url}/health") as r:
                ok = r.status == 200
            if ok and not inst.models:
                async with self._session.get(f"{inst.url}/v1/models") as r:
                    if r.status == 200:
                        body = await r.json()
                        inst.models = tuple(m["id"] for m in body.get("data", []) if "id" in m)
        except asyncio.TimeoutError:  # aiohttp's timeouts subclass it
            timed_out = True
        except (aiohttp.ClientError, ValueError, KeyError, TypeError):
            ok = False
        inst.last_check = time.monotonic()
        if timed_out and inst.healthy and inst.failures + 1 < self.timeouts_before_down:
            # A busy engine (a long prefill on few cores) can miss one probe deadline: only
            # consecutive misses take it out. A refused connection or an error status does at once.
            inst.failures += 1
            return True
        self.set_health(inst, ok)
        return ok

    def set_health(self, inst: Instance, ok: bool) -> None:
        inst.failures = 0 if ok else inst.failures + 1
        if ok != inst.healthy:
            inst.healthy = ok
            if not ok:
                inst.models = ()
                abort_waits(inst.waits)
            log.warning("instance %s (%s) is %s", inst.id, inst.url, "up" if ok else "DOWN")
            self._changed(inst)

    def mark_failed(self, inst: Instance) -> None:
        """A request to ``inst`` failed (a connection error, or one of its bounds fired): take
        it out until a probe passes; the requests still waiting on it end now (``waits``)."""
        self.set_health(inst, False)

    def _changed(self, inst: Instance) -> None:
        if self.on_change is not None:
            self.on_change(inst)
