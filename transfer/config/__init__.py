"""Typed configuration shared by every component: transfer engine, store, connector and proxy.

One immutable :class:`MooncakeConfig`, loaded with precedence (later wins)::

    defaults < JSON/YAML file < environment variables < overrides / CLI flags

**File.** ``load_config(path)`` or ``$MOONCAKE_CONFIG_PATH``. Mooncake's own JSON format loads
unchanged: its flat keys ``local_hostname``, ``metadata_server`` (default ``P2PHANDSHAKE``),
``global_segment_size`` (default 3.125 GiB), ``local_buffer_size`` (default 1 GiB),
``protocol`` (``tcp``/``rdma``/``shm``, default ``tcp``), ``device_name`` (default ``""``) and
``master_server_address`` (default ``127.0.0.1:50051``) sit at the top level. Keys other Mooncake
consumers use that we do not (``mode``, ``tenant_id``, ``enable_offload``, SGLang's
``check_server``...; see :data:`IGNORED_MOONCAKE_KEYS`) are logged and ignored; any other unknown
key is an error. Our settings live in sections::

    {"protocol": "tcp", "global_segment_size": "4GB",
     "rpc": {"max_frame_size": "64MB"}, "master": {"port": 50051}, "proxy": {"port": 8000}}

Sections: ``rpc`` (max_frame_size, connect_timeout, request_timeout), ``master`` (host, port
50051, metrics_port 9003), ``metadata`` (HTTP metadata server: host, port 8080, path
``/metadata``), ``etcd`` (endpoints, timeout), ``transfer`` (enable_shm, streams_per_peer 4,
slice_size 1 MiB), ``proxy`` (host, port 8000). Bind hosts default to ``127.0.0.1``.

**Sizes** accept bytes or strings like ``"4GB"``, ``"512MB"``, ``"1.5GiB"``; like Mooncake and
vLLM, units are powers of 1024 whatever the spelling (see :func:`parse_size`).

**Environment.** Mooncake's variables for Mooncake's keys - ``MOONCAKE_LOCAL_HOSTNAME``,
``MOONCAKE_TE_META_DATA_SERVER``, ``MOONCAKE_GLOBAL_SEGMENT_SIZE``, ``MOONCAKE_LOCAL_BUFFER_SIZE``,
``MOONCAKE_PROTOCOL``, ``MOONCAKE_DEVICE``, ``MOONCAKE_MASTER`` - plus ``MOONCAKE_AUTH_SECRET``
and ``MOONCAKE_<SECTION>_<FIELD>`` for section settings (``MOONCAKE_RPC_MAX_FRAME_SIZE=128MB``,
``MOONCAKE_TRANSFER_ENABLE_SHM=false``, ``MOONCAKE_ETCD_ENDPOINTS=h1:2379,h2:2379``).

**CLI.** :func:`add_config_arguments` / :func:`config_from_args`.

**Secret.** ``auth_secret`` (bytes or ``None``) is never shown by ``repr``, ``to_dict``, logs or
errors, and has no CLI flag.

Every mistake raises a single :class:`ConfigError` (a ``ValueError``) naming the dotted key, the
value, its source and what is allowed.
"""

from transfer.config.cli import add_config_arguments, config_from_args
from transfer.config.errors import ConfigError
from transfer.config.loader import (
    CONFIG_PATH_ENV,
    IGNORED_MOONCAKE_KEYS,
    load_config,
    read_config_file,
)
from transfer.config.schema import (
    PROTOCOLS,
    EtcdConfig,
    MasterConfig,
    MetadataConfig,
    MooncakeConfig,
    ProxyConfig,
    RpcConfig,
    StoreConfig,
    TlsConfig,
    TransferConfig,
    env_var_name,
)
from transfer.config.sizes import format_size, parse_size
from transfer.config.values import split_address

__all__ = [
    "CONFIG_PATH_ENV",
    "IGNORED_MOONCAKE_KEYS",
    "PROTOCOLS",
    "ConfigError",
    "EtcdConfig",
    "MasterConfig",
    "MetadataConfig",
    "MooncakeConfig",
    "ProxyConfig",
    "RpcConfig",
    "StoreConfig",
    "TlsConfig",
    "TransferConfig",
    "add_config_arguments",
    "config_from_args",
    "env_var_name",
    "format_size",
    "load_config",
    "parse_size",
    "read_config_file",
    "split_address",
]
