"""The typed configuration: frozen dataclass sections, each field carrying its own parser and help.

Why field metadata instead of a separate schema: adding a setting is one line - the default,
the converter, the help text - and the loader, env-var mapping, CLI flags and ``to_dict`` all
pick it up. Sections validate themselves in ``__post_init__``, so ``MooncakeConfig(...)``,
``dataclasses.replace`` and :meth:`MooncakeConfig.replace` can never produce an invalid object.

Layout mirrors the file format: Mooncake's flat keys at the top level (so a Mooncake JSON file
loads unchanged) and our own settings in named sections (``rpc``, ``master``, ``metadata``,
``etcd``, ``transfer``, ``proxy``, ``tls``, ``store``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar

from transfer.config.errors import REDACTED, ConfigError
from transfer.config.fields import (
    DEFAULT_BIND_HOST,
    Section,
    Setting,
    _bind_port,
    _host,
    _plain,
    _setting_of,
    _size,
    _timeout,
    _validate_fields,
    setting,
)
from transfer.config.values import (
    P2P_HANDSHAKE,
    to_address,
    to_addresses,
    to_bool,
    to_choice,
    to_float,
    to_http_path,
    to_int,
    to_local_hostname,
    to_metadata_server,
    to_secret,
    to_str_or_empty,
)

__all__ = [
    "PROTOCOLS",
    "SECTIONS",
    "EtcdConfig",
    "MasterConfig",
    "MetadataConfig",
    "MooncakeConfig",
    "ProxyConfig",
    "RpcConfig",
    "Section",
    "Setting",
    "StoreConfig",
    "TlsConfig",
    "TransferConfig",
    "env_var_name",
    "iter_settings",
]

# Transports this implementation provides. Mooncake's C++ engine also knows nvmeof, nvlink, hip,
# cxl, ascend...; we reject those up front instead of failing at the first transfer.
PROTOCOLS = ("tcp", "rdma", "shm")

# Defaults match Mooncake's (mooncake-wheel/mooncake/mooncake_config.py and the master's flags).
DEFAULT_GLOBAL_SEGMENT_SIZE = 3355443200  # 3.125 GiB
DEFAULT_LOCAL_BUFFER_SIZE = 1 << 30  # 1 GiB
DEFAULT_MASTER_PORT = 50051
DEFAULT_METADATA_PORT = 8080
DEFAULT_METRICS_PORT = 9003
DEFAULT_PROXY_PORT = 8000

_MIB = 1 << 20
_GIB = 1 << 30

@dataclass(frozen=True)
class RpcConfig(Section):
    """Knobs of the shared RPC plumbing (:mod:`transfer.rpc`), for every client and server."""

    name: ClassVar[str] = "rpc"

    max_frame_size: int = _size(
        64 * _MIB,
        1024,
        2 * _GIB,
        "largest RPC frame accepted or sent; bigger payloads belong on the transfer engine",
    )
    connect_timeout: float = _timeout(5.0, "how long to wait for a TCP connect + handshake")
    request_timeout: float = _timeout(30.0, "how long to wait for an RPC reply")
    retry_timeout: float = _timeout(
        15.0,
        "how long a client keeps retrying a call across reconnects and leader failovers "
        "before giving up (short for latency-bound callers such as inference engines)",
    )


@dataclass(frozen=True)
class MasterConfig(Section):
    """The store master's listening side (clients dial ``master_server_address``)."""

    name: ClassVar[str] = "master"

    host: str = _host("address the master's RPC server binds to")
    port: int = _bind_port(DEFAULT_MASTER_PORT, "master RPC port (Mooncake's --rpc_port)")
    metrics_port: int = _bind_port(
        DEFAULT_METRICS_PORT, "master Prometheus metrics port (Mooncake's --metrics_port)"
    )
    rpc_address: str = setting(
        "",
        help="address clients dial to reach this master, published in etcd under HA; "
        "empty = host:port",
        parse=to_str_or_empty,
        metavar="HOST:PORT",
    )
    enable_http_metadata_server: bool = setting(
        True,
        help="host the HTTP metadata server (metadata section's host/port/path) in the master",
        parse=to_bool,
        flag=True,
    )
    default_kv_lease_ttl: int = setting(
        10_000,
        help="lease a read grants, in ms: a leased object is neither evicted nor removed",
        parse=partial(to_int, lo=1, hi=86_400_000),
        metavar="MS",
    )
    default_kv_soft_pin_ttl: int = setting(
        1_800_000,
        help="how long a soft pin protects an object from eviction, in ms",
        parse=partial(to_int, lo=1, hi=30 * 86_400_000),
        metavar="MS",
    )
    eviction_high_watermark_ratio: float = setting(
        0.90,
        help="memory usage ratio above which objects are evicted",
        parse=partial(to_float, lo=0.01, hi=1.0),
        metavar="RATIO",
    )
    eviction_ratio: float = setting(
        0.05,
        help="share of capacity one eviction pass frees",
        parse=partial(to_float, lo=0.0, hi=1.0),
        metavar="RATIO",
    )
    enable_ssd_offload: bool = setting(
        True,
        help="demote objects chosen for eviction to a file (SSD-tier) segment when one with room "
        "is mounted, instead of dropping them",
        parse=to_bool,
        flag=True,
    )
    ssd_offload_timeout: float = _timeout(
        10.0, "a demotion to the file tier not finished this long is abandoned (object evicted)"
    )
    client_ttl: float = _timeout(
        10.0, "a client silent this long is declared dead and its segments unmounted"
    )
    put_start_timeout: float = _timeout(
        30.0, "a put started and not ended this long is revoked and its space reclaimed"
    )
    enable_ha: bool = setting(
        False,
        help="leader election through etcd (needs etcd.endpoints); standbys take over",
        parse=to_bool,
        flag=True,
    )
    leader_lease_ttl: float = setting(
        2.0,
        help="etcd lease of the leader key, in seconds (etcd rounds up to whole seconds): "
        "a dead leader is replaced about this fast",
        parse=partial(to_float, lo=0.0, hi=60.0),
        metavar="SECONDS",
    )
    tenants_file: str = setting(
        "",
        help="JSON/YAML file of tenants (id -> secret, quota): each tenant's keys live in its "
        "own namespace under a byte quota (docs/security.md); empty = single-tenant",
        parse=to_str_or_empty,
        metavar="PATH",
    )


@dataclass(frozen=True)
class MetadataConfig(Section):
    """The HTTP metadata server (Mooncake's ``mooncake_http_metadata_server``)."""

    name: ClassVar[str] = "metadata"

    host: str = _host("address the HTTP metadata server binds to")
    port: int = _bind_port(DEFAULT_METADATA_PORT, "HTTP metadata server port")
    path: str = setting(
        "/metadata",
        help="URL path the metadata server serves",
        parse=to_http_path,
        metavar="PATH",
    )


@dataclass(frozen=True)
class EtcdConfig(Section):
    """etcd used for metadata and service discovery when configured."""

    name: ClassVar[str] = "etcd"

    endpoints: tuple[str, ...] = setting(
        (),
        help="etcd client endpoints, comma-separated host:port",
        parse=to_addresses,
        metavar="HOST:PORT[,...]",
    )
    timeout: float = _timeout(5.0, "timeout of one etcd operation")


@dataclass(frozen=True)
class TransferConfig(Section):
    """Transfer-engine tuning that is ours, not Mooncake's."""

    name: ClassVar[str] = "transfer"

    enable_shm: bool = setting(
        True,
        help="same-host shortcuts (shared-memory copies, direct file I/O) instead of TCP when "
        "both ends are on this host; turn off where separate hosts share /dev/shm (namespaces)",
        parse=to_bool,
        flag=True,
    )
    streams_per_peer: int = setting(
        4,
        help="parallel TCP streams to each peer",
        parse=partial(to_int, lo=1, hi=64),
        metavar="N",
    )
    slice_size: int = _size(_MIB, 4096, 256 * _MIB, "unit a large transfer is split into")
    max_retries: int = setting(
        3,
        help="times a failed slice is retried on another path before its request fails",
        parse=partial(to_int, lo=0, hi=16),
        metavar="N",
    )
    io_timeout: float = _timeout(10.0, "how long a data connection may stall before it fails")
    busy_poll_us: int = setting(
        200,
        help="how long a caller waiting on its own thread for a small reply (a master call, a "
        "data-port answer) polls before it sleeps, in microseconds; 0 never polls. Polling "
        "skips the wake-up of a sleeping thread, which on virtual machines costs tens of "
        "microseconds per reply. Any polling stops while the host has no core to spare "
        "(as many other runnable threads as cores)",
        parse=partial(to_int, lo=0, hi=100_000),
        metavar="US",
    )
    staging_chunk_size: int = _size(
        4 * _MIB, 64 * 1024, 1024 * _MIB,
        "pinned host chunk that CUDA memory is staged through on tcp and shm; a longer CUDA "
        "request is staged a chunk per piece, small ones share a chunk")
    staging_chunks: int = setting(
        16,
        help="pinned staging chunks per engine, allocated on first use as needed; work that "
        "finds none free is staged in pageable memory (or, on shm, copied straight to the "
        "peer's pages), slower but never waiting. Raise it for batches of CUDA KV blocks "
        "larger than staging_chunk_size x staging_chunks",
        parse=partial(to_int, lo=1, hi=1024),
        metavar="N",
    )
    serve_poll_us: int = setting(
        300,
        help="how long the tcp data server polls for a connection's next request after "
        "answering one, and for the next bytes of a payload it is receiving, before it "
        "sleeps, in microseconds; 0 never polls. One connection at a time polls, only while "
        "no other one is inside a request and the host has a core to spare; 1 MiB puts "
        "measured ~420-500 -> ~310-400 us with it on a 2-core VM",
        parse=partial(to_int, lo=0, hi=100_000),
        metavar="US",
    )


@dataclass(frozen=True)
class ProxyConfig(Section):
    """The prefill/decode proxy (OpenAI-compatible HTTP front door)."""

    name: ClassVar[str] = "proxy"

    host: str = _host("address the proxy binds to")
    port: int = _bind_port(DEFAULT_PROXY_PORT, "proxy HTTP port")


@dataclass(frozen=True)
class TlsConfig(Section):
    """Optional TLS on the TCP control (RPC) and data connections (:mod:`transfer.tls`)."""

    name: ClassVar[str] = "tls"

    enabled: bool = setting(
        False,
        help="TLS on RPC, control and data connections (needs cert_file and key_file)",
        parse=to_bool,
        flag=True,
    )
    cert_file: str = setting("", help="PEM certificate (chain) this process presents",
                             parse=to_str_or_empty, metavar="PATH")
    key_file: str = setting("", help="PEM private key of cert_file", parse=to_str_or_empty,
                            metavar="PATH")
    ca_file: str = setting(
        "",
        help="PEM CA bundle: when set, TLS is mutual and every peer must present a certificate "
        "it signed; empty = encryption without peer verification",
        parse=to_str_or_empty,
        metavar="PATH",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled and not (self.cert_file and self.key_file):
            raise ConfigError("TLS is enabled but tls.cert_file or tls.key_file is empty",
                              key="tls.enabled", value=True)


@dataclass(frozen=True, repr=False)
class StoreConfig(Section):
    """Store-client settings of ours: the tenant a client acts as on a multi-tenant master."""

    name: ClassVar[str] = "store"

    tenant_id: str = setting(
        "",
        help="tenant this client authenticates to the master as; empty = no tenant",
        parse=to_str_or_empty,
        metavar="ID",
    )
    tenant_secret: bytes | None = setting(
        None,
        help="the tenant's secret (proves tenant_id to the master)",
        parse=to_secret,
        secret=True,
        cli=False,
    )
    reserve_ahead: int = _size(
        64 * _MIB,
        0,
        64 * _GIB,
        "space a writing client asks the master for ahead of its puts, so that a plain put "
        "(one replica, no preferred segment) is its write plus one master round trip instead "
        "of two; 0 turns it off",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.tenant_id) != (self.tenant_secret is not None):
            raise ConfigError("store.tenant_id and store.tenant_secret must be set together",
                              key="store.tenant_id", value=self.tenant_id)

    def __repr__(self) -> str:
        shown = None if self.tenant_secret is None else REDACTED
        return (f"StoreConfig(tenant_id={self.tenant_id!r}, tenant_secret={shown}, "
                f"reserve_ahead={self.reserve_ahead})")


SECTIONS: tuple[type[Section], ...] = (
    RpcConfig,
    MasterConfig,
    MetadataConfig,
    EtcdConfig,
    TransferConfig,
    ProxyConfig,
    TlsConfig,
    StoreConfig,
)
_SECTION_BY_NAME: dict[str, type[Section]] = {cls.name: cls for cls in SECTIONS}

_C = TypeVar("_C", bound="MooncakeConfig")


@dataclass(frozen=True, repr=False)
class MooncakeConfig:
    """The whole configuration, shared by transfer engine, store, connector and proxy.

    Build it with :func:`~transfer.config.load_config` (defaults < file < env < overrides/CLI).
    It is immutable; derive variants with :meth:`replace`.
    """

    # Mooncake's own keys, flat, same names, env vars and defaults as Mooncake.
    local_hostname: str = setting(
        DEFAULT_BIND_HOST,
        help="this node's address as peers should dial it (host or host:port)",
        parse=to_local_hostname,
        metavar="HOST[:PORT]",
        env="MOONCAKE_LOCAL_HOSTNAME",
    )
    metadata_server: str = setting(
        P2P_HANDSHAKE,
        help="where engines exchange segment metadata: P2PHANDSHAKE, etcd://h:p, http://h:p/metadata",
        parse=to_metadata_server,
        metavar="URL",
        env="MOONCAKE_TE_META_DATA_SERVER",
    )
    global_segment_size: int = _size(
        DEFAULT_GLOBAL_SEGMENT_SIZE,
        0,
        1 << 50,
        "memory this node contributes to the pool (0 = contribute none)",
        env="MOONCAKE_GLOBAL_SEGMENT_SIZE",
    )
    local_buffer_size: int = _size(
        DEFAULT_LOCAL_BUFFER_SIZE,
        1,
        1 << 50,
        "registered staging buffer for this client",
        env="MOONCAKE_LOCAL_BUFFER_SIZE",
    )
    protocol: str = setting(
        "tcp",
        help=f"transport: {', '.join(PROTOCOLS)}",
        parse=partial(to_choice, choices=PROTOCOLS),
        metavar="|".join(PROTOCOLS),
        env="MOONCAKE_PROTOCOL",
    )
    device_name: str = setting(
        "",
        help="RDMA device(s), e.g. mlx5_0; empty = auto-detect",
        parse=to_str_or_empty,
        metavar="NAME",
        env="MOONCAKE_DEVICE",
    )
    master_server_address: str = setting(
        f"127.0.0.1:{DEFAULT_MASTER_PORT}",
        help="store master address clients dial",
        parse=to_address,
        metavar="HOST:PORT",
        env="MOONCAKE_MASTER",
    )
    # Ours.
    auth_secret: bytes | None = setting(
        None,
        help="shared secret authenticating RPC peers; unset = no authentication",
        parse=to_secret,
        secret=True,
        cli=False,
        env="MOONCAKE_AUTH_SECRET",
    )
    rpc: RpcConfig = field(default_factory=RpcConfig)
    master: MasterConfig = field(default_factory=MasterConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTION_BY_NAME.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = build_section(cls, value)
            elif not isinstance(value, cls):
                raise ConfigError(
                    f"expected a mapping of {cls.name} settings", key=name, value=value
                )
            object.__setattr__(self, name, value)
        _validate_fields(self, "")

    def replace(self: _C, **changes: Any) -> _C:
        """A validated copy with ``changes`` applied.

        Sections can be changed in place of the whole: ``replace(rpc={"max_frame_size": "1MB"})``
        or ``replace(**{"rpc.max_frame_size": "1MB"})`` keep the section's other values.
        """
        merged: dict[str, Any] = {}
        section_changes: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            section, dot, name = key.partition(".")
            if dot:
                section_changes.setdefault(section, {})[name] = value
            elif key in _SECTION_BY_NAME and isinstance(value, Mapping):
                section_changes.setdefault(key, {}).update(value)
            else:
                merged[key] = value
        for section, values in section_changes.items():
            if section not in _SECTION_BY_NAME:
                raise ConfigError(
                    f"unknown section; known sections: {', '.join(_SECTION_BY_NAME)}", key=section
                )
            current = merged.get(section, getattr(self, section))
            base = current.to_dict() if isinstance(current, Section) else {}
            merged[section] = build_section(_SECTION_BY_NAME[section], {**base, **values})
        unknown = sorted(set(merged) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(_known_keys_message(), key=unknown[0])
        return dataclasses.replace(self, **merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able data in the file layout; the auth secret shows as ``<redacted>``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.to_dict() if isinstance(value, Section) else _plain(value, _setting_of(f))
            )
        return out

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            spec = _setting_of(f)
            value = getattr(self, f.name)
            shown = REDACTED if spec and spec.secret and value is not None else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"MooncakeConfig({', '.join(parts)})"


def build_section(cls: type[Section], values: Mapping[str, Any]) -> Section:
    """``cls(**values)`` with unknown keys reported as one ConfigError listing the known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(
                f"unknown key in section {cls.name!r}; known keys: {', '.join(known)}",
                key=f"{cls.name}.{key}",
            )
    return cls(**values)


def _known_keys_message() -> str:
    return "unknown key; known keys: " + ", ".join(key for key, _ in iter_settings())


def section_class(name: str) -> type[Section] | None:
    """The section class stored under ``name`` in files, or ``None``."""
    return _SECTION_BY_NAME.get(name)


def iter_settings() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every setting as ``(dotted key, field)``: top-level keys first, then each section's."""
    for f in dataclasses.fields(MooncakeConfig):
        if _setting_of(f) is not None:
            yield f.name, f
    for cls in SECTIONS:
        for f in dataclasses.fields(cls):
            yield f"{cls.name}.{f.name}", f


def setting_of(f: dataclasses.Field[Any]) -> Setting:
    """The :class:`Setting` of a field from :func:`iter_settings`."""
    spec = _setting_of(f)
    assert spec is not None, f.name
    return spec


def env_var_name(key: str) -> str:
    """The environment variable for a dotted key.

    Mooncake's keys keep Mooncake's names (``MOONCAKE_MASTER``, ``MOONCAKE_DEVICE``...); ours are
    ``MOONCAKE_<SECTION>_<FIELD>`` upper-cased, e.g. ``rpc.max_frame_size`` ->
    ``MOONCAKE_RPC_MAX_FRAME_SIZE``.
    """
    for candidate, f in iter_settings():
        if candidate == key:
            spec = setting_of(f)
            if spec.env:
                return spec.env
            break
    return "MOONCAKE_" + key.replace(".", "_").upper()
