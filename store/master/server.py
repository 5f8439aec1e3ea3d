"""The master process: store + RPC + metrics/health + embedded metadata server + HA, wired up.

:class:`MasterServer` is what ``mooncake-master`` runs and what in-process tests start. Without
HA it serves at once. With HA it binds everything, answers ``UNAVAILABLE_IN_CURRENT_STATUS``
to RPCs while standing by (so a client that dialled a stale address gets a clear answer), and
starts serving when elected; losing leadership stops serving and sets :attr:`lost_leadership`
(the CLI then exits non-zero so a supervisor restarts it as a fresh standby: its metadata is
stale and the new leader rebuilds from clients anyway).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from transfer.config import MooncakeConfig
from transfer.metadata.http_server import HttpMetadataServer
from transfer.rpc import RpcServer
from transfer.tls import tls_contexts

from .eviction import Evictor
from .ha import LeaderElection
from .liveness import ClientRegistry
from .metrics import MasterMetrics
from .objects import ObjectStore
from .service import MasterService
from .tenants import Tenancy, load_tenants

__all__ = ["MasterServer"]

logger = logging.getLogger(__name__)


class MasterServer:
    """One master, configured from :class:`MooncakeConfig` (``master``, ``metadata``, ``etcd``,
    ``rpc``, ``tls`` sections and ``auth_secret``). Ports of 0 pick free ones (see the
    properties). With ``master.tenants_file`` it is multi-tenant (:mod:`.tenants`)."""

    def __init__(self, config: MooncakeConfig | None = None) -> None:
        self.config = config = config if config is not None else MooncakeConfig()
        m = config.master
        if m.enable_ha and not config.etcd.endpoints:
            raise ValueError("enable_ha needs etcd endpoints (--etcd_endpoints)")
        self.store = ObjectStore(lease_ttl=m.default_kv_lease_ttl / 1000.0,
                                 soft_pin_ttl=m.default_kv_soft_pin_ttl / 1000.0)
        self.evictor = Evictor(self.store, high_watermark=m.eviction_high_watermark_ratio,
                               ratio=m.eviction_ratio, offload=m.enable_ssd_offload,
                               offload_timeout=m.ssd_offload_timeout)
        self.clients = ClientRegistry(self.store, client_ttl=m.client_ttl,
                                      put_timeout=m.put_start_timeout)
        self.metrics = MasterMetrics(self.store, self.clients, self.evictor, lambda: self.role)
        self.tenancy: Tenancy | None = None
        if m.tenants_file:
            if config.auth_secret is None:
                raise ValueError("master.tenants_file needs auth_secret: store nodes and other "
                                 "infrastructure authenticate with it, tenants with their own")
            self.tenancy = Tenancy(load_tenants(m.tenants_file), self.store)
            self.metrics.registry.register(self.tenancy)  # type: ignore[arg-type]
        self.service = MasterService(self.store, self.clients, self.evictor,
                                     observe=self.metrics.observe, tenancy=self.tenancy)
        self.service.serving = not m.enable_ha
        tls = tls_contexts(config)
        self.rpc = RpcServer(m.host, m.port, secret=config.auth_secret,
                             max_frame_size=config.rpc.max_frame_size,
                             tls=None if tls is None else tls.server,
                             identities=None if self.tenancy is None else self.tenancy.secret_of)
        self.service.register(self.rpc)
        self.metadata: HttpMetadataServer | None = None
        if m.enable_http_metadata_server:
            md = config.metadata
            self.metadata = HttpMetadataServer(md.host, md.port, path=md.path,
                                               secret=config.auth_secret)
        self.election: LeaderElection | None = None
        self.lost_leadership = asyncio.Event()
        self.elected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._metrics_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def role(self) -> str:
        """``leader`` (serving), ``standby`` (waiting for election) or ``stopped``."""
        if self.lost_leadership.is_set():
            return "stopped"
        return "leader" if self.service.serving else "standby"

    @property
    def rpc_address(self) -> str:
        """What clients dial (``master.rpc_address``, else the bound ``host:port``)."""
        return self.config.master.rpc_address or self.rpc.address

    @property
    def metrics_port(self) -> int:
        if self._metrics_port is None:
            raise RuntimeError("master is not started")
        return self._metrics_port

    async def start(self) -> None:
        """Bind RPC, metrics and metadata; serve now, or campaign in the background (HA)."""
        await self.rpc.start()
        try:
            if self.metadata is not None:
                await self.metadata.start()
            app = web.Application()
            self.metrics.add_routes(app)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(runner, self.config.master.host, self.config.master.metrics_port)
            await site.start()
            self._metrics_port = int(runner.addresses[0][1])
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._sweep_forever(), name="master-sweep"))
        m = self.config.master
        if m.enable_ha:
            self.election = LeaderElection(self.config.etcd.endpoints, self.rpc_address,
                                           ttl=m.leader_lease_ttl)
            self._tasks.append(asyncio.create_task(self._lead(), name="master-election"))
        else:
            self.elected.set()
        logger.info("master %s: rpc %s, metrics :%d%s", self.role, self.rpc_address,
                    self._metrics_port,
                    f", metadata {self.metadata.url}" if self.metadata is not None else "")

    async def _lead(self) -> None:
        assert self.election is not None
        await self.election.campaign()
        self.service.serving = True
        self.elected.set()
        logger.info("master %s is now the leader", self.rpc_address)
        await self.election.watch()
        self.service.serving = False
        self.lost_leadership.set()

    async def _sweep_forever(self) -> None:
        m = self.config.master
        interval = max(0.05, min(1.0, m.client_ttl / 4, m.put_start_timeout / 4,
                                 m.ssd_offload_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            if not self.service.serving:
                continue
            try:
                self.clients.sweep()
                self.evictor.demoter.expire()
                self.service.replications.reclaim_stale(m.put_start_timeout)
                self.evictor.run()
            except Exception:
                logger.exception("master sweep failed")

    async def stop(self) -> None:
        """Stop everything; under HA the leader key is released so a standby takes over now."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self.service.serving = False
        if self.election is not None:
            with contextlib.suppress(Exception):
                await self.election.close()
        await self.rpc.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.metadata is not None:
            await self.metadata.stop()

    async def __aenter__(self) -> MasterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
