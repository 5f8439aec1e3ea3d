"""Tests for :mod:`transfer.config`: sizes, Mooncake's file format, YAML, env vars, CLI flags,
precedence, and one clear ConfigError per kind of mistake.

Files are real files in ``tmp_path``; the vLLM cross-checks load vLLM's own ``mooncake_store.py``
from the installed package, so "same semantics as vLLM" is checked against the real parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from transfer.config import (
    IGNORED_MOONCAKE_KEYS,
    ConfigError,
    MooncakeConfig,
    RpcConfig,
    add_config_arguments,
    config_from_args,
    env_var_name,
    format_size,
    load_config,
    parse_size,
    split_address,
)
from transfer.config.loader import MAX_CONFIG_FILE_BYTES

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
SECRET = "correct-horse-battery-staple"

# The MooncakeStoreConnector example config from vLLM's docs, as Mooncake users have it on disk.
MOONCAKE_JSON = {
    "local_hostname": "192.168.0.137",
    "metadata_server": "http://192.168.0.137:8080/metadata",
    "master_server_address": "192.168.0.137:50051",
    "global_segment_size": "4GB",
    "local_buffer_size": "512MB",
    "protocol": "rdma",
    "device_name": "mlx5_0",
    "mode": "embedded",
    "tenant_id": "default",
    "enable_offload": False,
}


@pytest.fixture(scope="module")
def vllm_mooncake_store() -> ModuleType:
    """vLLM's ``vllm/distributed/mooncake_store.py`` loaded standalone (it only needs ``regex``),
    without importing the rest of vLLM and torch."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vllm is part of the test venv"
    path = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "mooncake_store.py"
    module_spec = importlib.util.spec_from_file_location("_vllm_mooncake_store", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def write(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON (``.json``), YAML (``.yaml``/``.yml``) or verbatim text."""
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value


# --------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 * GiB),
        ("4gb", 4 * GiB),
        (" 4 GB ", 4 * GiB),
        ("4G", 4 * GiB),
        ("4GiB", 4 * GiB),
        ("512MB", 512 * MiB),
        ("512mib", 512 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1.5GB", 3 * GiB // 2),
        ("64KB", 64 * KiB),
        ("64k", 64 * KiB),
        ("2TB", 2 << 40),
        ("100", 100),
        ("100B", 100),
        (".5kb", 512),
        ("0.1KB", 102),  # truncated toward zero, as Mooncake's int(float(num) * unit)
        (3355443200, 3355443200),
        (3355443200.0, 3355443200),
        (0, 0),
    ],
)
def test_parse_size_accepts_mooncake_spellings(text: Any, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    ["4XB", "", "   ", "-1GB", -1, "1e9", "GB", "1.2.3GB", "4 G B", "0x10", True, None, [1], 1.5],
)
def test_parse_size_rejects_garbage(bad: Any) -> None:
    with pytest.raises(ValueError, match="byte count"):
        parse_size(bad)


def test_parse_size_rejects_sizes_beyond_64_bits() -> None:
    with pytest.raises(ValueError, match="at most"):
        parse_size("100000000TB")


@pytest.mark.parametrize(
    "text", ["4GB", "4gb", "512MB", "1.5GB", "64kb", "100", "100b", "0.25 gb", "3355443200"]
)
def test_parse_size_matches_vllm_on_its_grammar(vllm_mooncake_store: ModuleType, text: str) -> None:
    assert parse_size(text) == vllm_mooncake_store._parse_size(text)


@settings(max_examples=300, deadline=None)
@example(whole=262144, frac="216", unit="gb")  # float rounding: one byte above exact decimals
@given(
    whole=st.integers(min_value=0, max_value=10**6),
    frac=st.one_of(st.none(), st.text(alphabet="0123456789", min_size=1, max_size=3)),
    unit=st.sampled_from(["", "b", "kb", "mb", "gb", "KB", "Mb", "GB"]),
)
def test_parse_size_agrees_with_vllm_property(
    vllm_mooncake_store: ModuleType, whole: int, frac: str | None, unit: str
) -> None:
    text = f"{whole}{'.' + frac if frac else ''}{unit}"
    assert parse_size(text) == vllm_mooncake_store._parse_size(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_picks_largest_exact_unit() -> None:
    assert format_size(4 * GiB) == "4 GiB"
    assert format_size(1536 * MiB) == "1536 MiB"
    assert format_size(1000) == "1000 B"
    assert format_size(0) == "0 B"


# ------------------------------------------------------------------------------------ defaults


def test_defaults_match_mooncake() -> None:
    cfg = load_config(env={})
    assert cfg == MooncakeConfig()
    assert cfg.metadata_server == "P2PHANDSHAKE"
    assert cfg.protocol == "tcp"
    assert cfg.device_name == ""
    assert cfg.master_server_address == "127.0.0.1:50051"
    assert cfg.global_segment_size == 3355443200
    assert cfg.local_buffer_size == GiB
    assert (cfg.master.port, cfg.master.metrics_port) == (50051, 9003)
    assert (cfg.metadata.port, cfg.metadata.path) == (8080, "/metadata")
    assert cfg.proxy.port == 8000
    assert {cfg.master.host, cfg.metadata.host, cfg.proxy.host} == {"127.0.0.1"}
    assert cfg.rpc.max_frame_size == 64 * MiB
    assert cfg.transfer.enable_shm is True
    assert cfg.transfer.streams_per_peer == 4
    assert cfg.transfer.slice_size == MiB
    assert cfg.etcd.endpoints == ()
    assert cfg.auth_secret is None


def test_config_is_immutable_and_hashable() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.protocol = "rdma"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rpc.max_frame_size = 1  # type: ignore[misc]
    assert hash(cfg) == hash(MooncakeConfig())


# ---------------------------------------------------------------------- Mooncake's file format


def test_mooncake_json_file_loads_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, vllm_mooncake_store: ModuleType
) -> None:
    path = write(tmp_path / "mooncake.json", MOONCAKE_JSON)
    with caplog.at_level(logging.INFO, logger="transfer.config"):
        cfg = load_config(env={"MOONCAKE_CONFIG_PATH": str(path)})
    assert cfg.local_hostname == "192.168.0.137"
    assert cfg.metadata_server == "http://192.168.0.137:8080/metadata"
    assert cfg.master_server_address == "192.168.0.137:50051"
    assert cfg.global_segment_size == 4 * GiB
    assert cfg.local_buffer_size == 512 * MiB
    assert (cfg.protocol, cfg.device_name) == ("rdma", "mlx5_0")

    # vLLM's own loader reads the very same file to the same numbers.
    theirs = vllm_mooncake_store.MooncakeStoreConfig.from_file(str(path))
    assert (theirs.global_segment_size, theirs.local_buffer_size) == (
        cfg.global_segment_size,
        cfg.local_buffer_size,
    )
    assert (theirs.metadata_server, theirs.master_server_address, theirs.protocol) == (
        cfg.metadata_server,
        cfg.master_server_address,
        cfg.protocol,
    )

    # One log line per ignored Mooncake key, naming it.
    ignored = [
        r.getMessage() for r in caplog.records if "ignoring Mooncake config key" in r.getMessage()
    ]
    assert len(ignored) == 3
    for key in ("mode", "tenant_id", "enable_offload"):
        assert sum(f"'{key}'" in line for line in ignored) == 1


def test_every_ignored_mooncake_key_is_accepted(tmp_path: Path) -> None:
    data = {key: "anything" for key in IGNORED_MOONCAKE_KEYS}
    path = write(tmp_path / "all.json", data)
    assert load_config(path, env={}) == MooncakeConfig()


def test_mooncake_wheel_style_file_with_numbers(tmp_path: Path) -> None:
    # Mooncake's mooncake_config.py docstring example, with SGLang's extra keys.
    path = write(
        tmp_path / "wheel.json",
        {
            "local_hostname": "localhost",
            "metadata_server": "localhost:8080",
            "global_segment_size": 3355443200,
            "local_buffer_size": 1073741824,
            "protocol": "tcp",
            "device_name": "",
            "master_server_address": "localhost:8081",
            "enable_ssd_offload": True,
            "ssd_offload_path": "/nvme/mooncake_offload",
            "master_metrics_port": 9004,
            "check_server": False,
        },
    )
    cfg = load_config(path, env={})
    assert cfg.metadata_server == "localhost:8080"
    assert cfg.master_server_address == "localhost:8081"
    assert cfg.master.metrics_port == 9003  # SGLang's client-side key does not move our master


def test_null_device_name_as_mooncake_allows(tmp_path: Path) -> None:
    path = write(tmp_path / "null.json", {"protocol": "rdma", "device_name": None})
    assert load_config(path, env={}).device_name == ""


def test_yaml_file_with_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path / "cfg.yaml",
        textwrap.dedent(
            """\
            # Mooncake keys at top level, ours in sections.
            protocol: shm
            global_segment_size: 1.5GiB
            auth_secret: correct-horse-battery-staple
            rpc:
              max_frame_size: 128MB
              request_timeout: 2.5
            master: {host: 0.0.0.0, port: 0, metrics_port: 19003}
            metadata:
              path: /meta
            etcd:
              endpoints: [127.0.0.1:2379, "[::1]:2379"]
            transfer:
              enable_shm: no
              streams_per_peer: 8
              slice_size: 256KiB
            proxy:
            """
        ),
    )
    cfg = load_config(path, env={})
    assert cfg.protocol == "shm"
    assert cfg.global_segment_size == 3 * GiB // 2
    assert cfg.auth_secret == SECRET.encode()
    assert cfg.rpc == RpcConfig(max_frame_size=128 * MiB, connect_timeout=5.0, request_timeout=2.5)
    assert (cfg.master.host, cfg.master.port, cfg.master.metrics_port) == ("0.0.0.0", 0, 19003)
    assert cfg.metadata.path == "/meta"
    assert cfg.etcd.endpoints == ("127.0.0.1:2379", "[::1]:2379")
    assert cfg.transfer.enable_shm is False
    assert cfg.transfer.streams_per_peer == 8
    assert cfg.transfer.slice_size == 256 * KiB
    assert cfg.proxy.port == 8000


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("mooncake.conf", '{"protocol": "rdma"}'),  # no extension, JSON object
        ("mooncake.cfg", "protocol: rdma\n"),  # no extension, YAML
        ("mooncake.yml", "protocol: rdma\n"),
        ("mooncake.yaml", '{"protocol": "rdma"}'),  # JSON is YAML
    ],
)
def test_file_format_detection(tmp_path: Path, name: str, text: str) -> None:
    assert load_config(write(tmp_path / name, text), env={}).protocol == "rdma"


def test_empty_yaml_file_is_empty_config(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "empty.yaml", ""), env={}) == MooncakeConfig()


def test_dotted_keys_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "dotted.json", {"rpc.max_frame_size": "1MB"})
    assert load_config(path, env={}).rpc.max_frame_size == MiB


# ---------------------------------------------------------------------------------- precedence


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    path = write(
        tmp_path / "cfg.json",
        {
            "protocol": "rdma",
            "device_name": "from-file",
            "rpc": {"max_frame_size": "2MB"},
            "proxy": {"port": 1001},
        },
    )
    env = {
        "MOONCAKE_DEVICE": "from-env",
        "MOONCAKE_RPC_MAX_FRAME_SIZE": "3MB",
        "MOONCAKE_PROXY_PORT": "1002",
    }
    cfg = load_config(path, env=env, overrides={"proxy": {"port": 1003}})
    assert cfg.local_hostname == "127.0.0.1"  # default: no layer sets it
    assert cfg.protocol == "rdma"  # file beats default
    assert cfg.device_name == "from-env"  # env beats file
    assert cfg.rpc.max_frame_size == 3 * MiB  # env beats file, in a section
    assert cfg.proxy.port == 1003  # override beats env


def test_explicit_path_beats_config_path_env(tmp_path: Path) -> None:
    chosen = write(tmp_path / "chosen.json", {"protocol": "shm"})
    other = write(tmp_path / "other.json", {"protocol": "rdma"})
    assert load_config(chosen, env={"MOONCAKE_CONFIG_PATH": str(other)}).protocol == "shm"
    assert load_config(env={"MOONCAKE_CONFIG_PATH": str(other)}).protocol == "rdma"
    assert load_config(env={"MOONCAKE_CONFIG_PATH": ""}) == MooncakeConfig()


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "cfg.json", {"protocol": "rdma"})
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
    monkeypatch.setenv("MOONCAKE_MASTER", "10.0.0.1:50051")
    cfg = load_config()
    assert (cfg.protocol, cfg.master_server_address) == ("rdma", "10.0.0.1:50051")


def test_overrides_accept_nested_and_dotted_keys() -> None:
    cfg = load_config(
        env={},
        overrides={"rpc": {"connect_timeout": 1}, "rpc.request_timeout": "7", "protocol": "RDMA"},
    )
    assert (cfg.rpc.connect_timeout, cfg.rpc.request_timeout) == (1.0, 7.0)
    assert cfg.protocol == "rdma"


# ---------------------------------------------------------------------------------------- env


def test_mooncake_environment_variables() -> None:
    env = {
        "MOONCAKE_LOCAL_HOSTNAME": "10.0.0.5:17000",
        "MOONCAKE_TE_META_DATA_SERVER": "etcd://10.0.0.1:2379,10.0.0.2:2379",
        "MOONCAKE_GLOBAL_SEGMENT_SIZE": "8gb",
        "MOONCAKE_LOCAL_BUFFER_SIZE": "16777216",
        "MOONCAKE_PROTOCOL": "rdma",
        "MOONCAKE_DEVICE": "mlx5_0,mlx5_1",
        "MOONCAKE_MASTER": "10.0.0.1:50051",
        "MOONCAKE_AUTH_SECRET": SECRET,
    }
    cfg = load_config(env=env)
    assert cfg.local_hostname == "10.0.0.5:17000"
    assert cfg.metadata_server == "etcd://10.0.0.1:2379,10.0.0.2:2379"
    assert cfg.global_segment_size == 8 * GiB
    assert cfg.local_buffer_size == 16 * MiB
    assert (cfg.protocol, cfg.device_name) == ("rdma", "mlx5_0,mlx5_1")
    assert cfg.master_server_address == "10.0.0.1:50051"
    assert cfg.auth_secret == SECRET.encode()


def test_section_environment_variables_are_converted() -> None:
    env = {
        "MOONCAKE_RPC_MAX_FRAME_SIZE": "128MB",
        "MOONCAKE_RPC_CONNECT_TIMEOUT": "0.5",
        "MOONCAKE_MASTER_PORT": "60051",
        "MOONCAKE_METADATA_PATH": "/md",
        "MOONCAKE_ETCD_ENDPOINTS": "127.0.0.1:2379, 127.0.0.1:2380",
        "MOONCAKE_TRANSFER_ENABLE_SHM": "false",
        "MOONCAKE_TRANSFER_STREAMS_PER_PEER": "2",
        "MOONCAKE_TRANSFER_STAGING_CHUNK_SIZE": "8MiB",
        "MOONCAKE_TRANSFER_STAGING_CHUNKS": "64",
        "MOONCAKE_PROXY_HOST": "::",
    }
    cfg = load_config(env=env)
    assert cfg.rpc.max_frame_size == 128 * MiB
    assert cfg.rpc.connect_timeout == 0.5
    assert cfg.master.port == 60051
    assert cfg.metadata.path == "/md"
    assert cfg.etcd.endpoints == ("127.0.0.1:2379", "127.0.0.1:2380")
    assert cfg.transfer.enable_shm is False
    assert cfg.transfer.streams_per_peer == 2
    assert cfg.transfer.staging_chunk_size == 8 * MiB
    assert cfg.transfer.staging_chunks == 64
    assert cfg.proxy.host == "::"


def test_env_var_names() -> None:
    assert env_var_name("master_server_address") == "MOONCAKE_MASTER"
    assert env_var_name("metadata_server") == "MOONCAKE_TE_META_DATA_SERVER"
    assert env_var_name("device_name") == "MOONCAKE_DEVICE"
    assert env_var_name("auth_secret") == "MOONCAKE_AUTH_SECRET"
    assert env_var_name("rpc.max_frame_size") == "MOONCAKE_RPC_MAX_FRAME_SIZE"


def test_unknown_section_env_var_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transfer.config"):
        cfg = load_config(env={"MOONCAKE_RPC_MAX_FRAME_SISE": "1MB", "MOONCAKE_TENANT_ID": "x"})
    assert cfg == MooncakeConfig()
    messages = [r.getMessage() for r in caplog.records]
    assert any("MOONCAKE_RPC_MAX_FRAME_SISE" in m for m in messages)
    assert not any("MOONCAKE_TENANT_ID" in m for m in messages)  # another tool's variable


# ------------------------------------------------------------------------------ invalid config


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        ({"master": {"port": "abc"}}, "master.port", "integer from 0 to 65535"),
        ({"master.port": [1]}, "master.port", "got list"),
        ({"master.port": True}, "master.port", "got a boolean"),
        ({"transfer.streams_per_peer": 1.5}, "transfer.streams_per_peer", "got float"),
        ({"transfer.streams_per_peer": 0}, "transfer.streams_per_peer", "from 1 to 64"),
        ({"device_name": 0}, "device_name", "expected a string"),
        ({"transfer.enable_shm": "maybe"}, "transfer.enable_shm", "true/false"),
        ({"rpc.request_timeout": 0}, "rpc.request_timeout", "greater than 0"),
        ({"rpc.request_timeout": "nan"}, "rpc.request_timeout", "greater than 0"),
        ({"rpc": 5}, "rpc", "mapping of rpc settings"),
        ({"global_segment_size": "4XB"}, "global_segment_size", "'4GB'"),
        ({"global_segment_size": -1}, "global_segment_size", "cannot be negative"),
        ({"local_buffer_size": "-1GB"}, "local_buffer_size", "cannot be negative"),
        ({"local_buffer_size": 0}, "local_buffer_size", "from 1 to"),
        ({"rpc.max_frame_size": "3GB"}, "rpc.max_frame_size", "from 1024 to 2147483648"),
        ({"master.port": 70000}, "master.port", "0 to 65535"),
        ({"proxy.port": -1}, "proxy.port", "0 to 65535"),
        ({"protocol": "nvlink"}, "protocol", "one of tcp, rdma, shm"),
        ({"protocol": "udp"}, "protocol", "one of tcp, rdma, shm"),
        ({"master_server_address": "localhost"}, "master_server_address", "host:port"),
        ({"master_server_address": "host:"}, "master_server_address", "host:port"),
        ({"master_server_address": ":50051"}, "master_server_address", "host:port"),
        ({"master_server_address": "h:0"}, "master_server_address", "1 to 65535"),
        ({"master_server_address": "h:65536"}, "master_server_address", "1 to 65535"),
        ({"master_server_address": "::1:50051"}, "master_server_address", "brackets"),
        ({"master_server_address": "bad host:1"}, "master_server_address", "host:port"),
        ({"etcd.endpoints": ["127.0.0.1"]}, "etcd.endpoints", "host:port"),
        ({"metadata_server": "redis://10.0.0.1:6379"}, "metadata_server", "P2PHANDSHAKE"),
        ({"metadata_server": "etcd://"}, "metadata_server", "etcd://host:port"),
        ({"metadata_server": "http://:80/metadata"}, "metadata_server", "http(s)://"),
        ({"metadata_server": ""}, "metadata_server", "P2PHANDSHAKE"),
        ({"metadata.path": "metadata"}, "metadata.path", "starting with '/'"),
        ({"local_hostname": "a b"}, "local_hostname", "hostname or IP"),
        ({"master.host": "999.1.1.1"}, "master.host", "hostname or IP"),
    ],
)
def test_invalid_values_name_key_value_and_what_is_allowed(
    overrides: dict[str, Any], key: str, allowed: str
) -> None:
    err = config_error(env={}, overrides=overrides)
    assert err.key == key
    message = str(err)
    assert repr(key) in message
    assert allowed in message
    (value,) = overrides.values()
    if not isinstance(value, dict):
        assert err.value == value
        assert repr(value)[:50] in message
    assert "from overrides" in message


@pytest.mark.parametrize(
    "value",
    [
        "P2PHANDSHAKE",
        "p2phandshake",
        "etcd://10.0.0.1:2379",
        "etcd://a:1;b:2",
        "http://127.0.0.1:8080/metadata",
        "https://meta.example/metadata",
        "10.0.0.1:2379",
    ],
)
def test_metadata_server_forms(value: str) -> None:
    cfg = load_config(env={}, overrides={"metadata_server": value})
    assert cfg.metadata_server == (value if value.upper() != "P2PHANDSHAKE" else "P2PHANDSHAKE")


@pytest.mark.parametrize("value", ["[::1]:50051", "node-1.example:1", "10.0.0.1:65535", "_svc:80"])
def test_valid_addresses(value: str) -> None:
    assert (
        load_config(env={}, overrides={"master_server_address": value}).master_server_address
        == value
    )


def test_split_address() -> None:
    assert split_address("[::1]:50051") == ("::1", 50051)
    assert split_address("host:1") == ("host", 1)
    with pytest.raises(ValueError):
        split_address("host")


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg.json", {"global_segment_size": "4XB"})
    err = config_error(path=path, env={})
    assert err.key == "global_segment_size"
    assert f"config file {path}" in str(err)
    assert "'4XB'" in str(err)


def test_bad_value_in_env_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg.json", {"protocol": "tcp"})
    err = config_error(path=path, env={"MOONCAKE_PROTOCOL": "carrier-pigeon"})
    assert err.key == "protocol"
    assert "environment variable MOONCAKE_PROTOCOL" in str(err)
    err = config_error(env={"MOONCAKE_MASTER_PORT": "99999"})
    assert "environment variable MOONCAKE_MASTER_PORT" in str(err)


def test_unknown_top_level_key_lists_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg.json", {"global_segmnet_size": "4GB"})
    err = config_error(path=path, env={})
    message = str(err)
    assert err.key == "global_segmnet_size"
    assert "did you mean 'global_segment_size'" in message
    for known in ("local_hostname", "master_server_address", "rpc", "transfer", "proxy"):
        assert known in message
    assert str(path) in message


def test_unknown_section_key_lists_that_sections_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg.yaml", {"rpc": {"max_frame": 1}})
    err = config_error(path=path, env={})
    assert err.key == "rpc.max_frame"
    assert "rpc.max_frame_size" in str(err) and "rpc.request_timeout" in str(err)


def test_unknown_override_key() -> None:
    err = config_error(env={}, overrides={"proxy.prot": 1})
    assert err.key == "proxy.prot" and "proxy.port" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    err = config_error(path=path, env={})
    assert str(path) in str(err) and "cannot read" in str(err)
    err = config_error(env={"MOONCAKE_CONFIG_PATH": str(path)})
    assert str(path) in str(err)


def test_directory_and_fifo_are_refused_without_blocking(tmp_path: Path) -> None:
    assert "not a regular file" in str(config_error(path=tmp_path, env={}))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "not a regular file" in str(config_error(path=fifo, env={}))


def test_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", '{\n  "protocol": "tcp",\n  "device_name": \n}\n')
    message = str(config_error(path=path, env={}))
    assert f"{path}:4:1" in message and "malformed JSON" in message


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "protocol: tcp\nrpc:\n  max_frame_size: [1\n")
    message = str(config_error(path=path, env={}))
    assert f"{path}:4:" in message and "malformed YAML" in message


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("dup.json", '{"protocol": "tcp",\n "protocol": "rdma"}', None),
        ("dup.yaml", "protocol: tcp\nprotocol: rdma\n", 2),
    ],
)
def test_duplicate_keys_are_errors(tmp_path: Path, name: str, text: str, line: int | None) -> None:
    path = write(tmp_path / name, text)
    message = str(config_error(path=path, env={}))
    assert "duplicate key 'protocol'" in message
    if line is not None:
        assert f"{path}:{line}:" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- protocol\n- tcp\n")
    assert "must hold a mapping" in str(config_error(path=path, env={}))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"device_name": "\xe9"}')
    assert "not UTF-8" in str(config_error(path=path, env={}))


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_text('{"device_name": "' + "x" * MAX_CONFIG_FILE_BYTES + '"}')
    assert "limit" in str(config_error(path=path, env={}))


def test_yaml_python_tags_are_not_executed(tmp_path: Path) -> None:
    path = write(tmp_path / "evil.yaml", "device_name: !!python/object/apply:os.getcwd []\n")
    assert "malformed YAML" in str(config_error(path=path, env={}))


def test_non_string_key_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "intkey.yaml", "1: tcp\n")
    assert "keys must be strings" in str(config_error(path=path, env={}))


# -------------------------------------------------------------------------------------- secret


def test_secret_is_never_printed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "cfg.json", {"auth_secret": SECRET, "mode": "embedded"})
    with caplog.at_level(logging.DEBUG):
        cfg = load_config(path, env={})
    assert cfg.auth_secret == SECRET.encode()
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert "<redacted>" in repr(cfg)
    assert cfg.to_dict()["auth_secret"] == "<redacted>"
    assert SECRET not in json.dumps(cfg.to_dict())
    assert SECRET not in caplog.text


def test_bad_secret_error_does_not_echo_it() -> None:
    err = config_error(env={"MOONCAKE_AUTH_SECRET": "x" * 5000})
    assert err.key == "auth_secret"
    assert "xxxxx" not in str(err) and "<redacted>" in str(err)


def test_empty_secret_is_an_error_not_auth_off() -> None:
    err = config_error(env={"MOONCAKE_AUTH_SECRET": ""})
    assert err.key == "auth_secret" and "non-empty" in str(err)


def test_redacted_dump_cannot_be_loaded_as_a_secret(tmp_path: Path) -> None:
    cfg = load_config(env={"MOONCAKE_AUTH_SECRET": SECRET})
    path = write(tmp_path / "dump.yaml", cfg.to_dict())
    err = config_error(path=path, env={})
    assert err.key == "auth_secret" and "placeholder" in str(err)


def test_to_dict_round_trips_through_a_file(tmp_path: Path) -> None:
    cfg = load_config(
        env={"MOONCAKE_ETCD_ENDPOINTS": "127.0.0.1:2379", "MOONCAKE_PROTOCOL": "shm"},
        overrides={"rpc.max_frame_size": "3MB", "transfer.enable_shm": False},
    )
    for name in ("dump.json", "dump.yaml"):
        path = write(tmp_path / name, cfg.to_dict())
        assert load_config(path, env={}) == cfg


# ------------------------------------------------------------------------------------- replace


def test_replace_validates_and_converts() -> None:
    cfg = load_config(env={})
    changed = cfg.replace(protocol="RDMA", global_segment_size="2GB")
    assert (changed.protocol, changed.global_segment_size) == ("rdma", 2 * GiB)
    assert cfg.protocol == "tcp"  # original untouched
    with pytest.raises(ConfigError) as info:
        cfg.replace(protocol="udp")
    assert info.value.key == "protocol"
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, master_server_address="nope")
    with pytest.raises(ConfigError) as info:
        cfg.rpc.replace(max_frame_size="4XB")
    assert info.value.key == "rpc.max_frame_size"


def test_replace_section_keeps_its_other_values() -> None:
    cfg = load_config(env={}, overrides={"rpc.request_timeout": 9})
    changed = cfg.replace(rpc={"max_frame_size": "1MB"})
    assert (changed.rpc.max_frame_size, changed.rpc.request_timeout) == (MiB, 9.0)
    dotted = cfg.replace(**{"rpc.max_frame_size": "1MB"})
    assert dotted == changed
    assert cfg.replace(rpc=cfg.rpc.replace(max_frame_size=MiB)) == changed
    with pytest.raises(ConfigError) as info:
        cfg.replace(rpc={"max_frame": 1})
    assert info.value.key == "rpc.max_frame"
    with pytest.raises(ConfigError):
        cfg.replace(nonsense=1)


def test_constructor_accepts_section_mappings() -> None:
    cfg = MooncakeConfig(transfer={"slice_size": "64KB"})  # type: ignore[arg-type]
    assert cfg.transfer.slice_size == 64 * KiB
    with pytest.raises(ConfigError):
        MooncakeConfig(transfer="fast")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- CLI


def make_parser(*include: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mooncake-test", exit_on_error=True)
    parser.add_argument("--model", default="m")  # the host application's own flag
    add_config_arguments(parser, include or None, **kwargs)
    return parser


@pytest.mark.parametrize("flag", ["--rpc-max-frame-size", "--rpc_max_frame_size"])
def test_cli_accepts_dashes_and_underscores(flag: str) -> None:
    args = make_parser().parse_args([flag, "8MB"])
    assert config_from_args(args, env={}).rpc.max_frame_size == 8 * MiB


def test_cli_only_overrides_what_was_given(tmp_path: Path) -> None:
    path = write(
        tmp_path / "cfg.json",
        {"protocol": "rdma", "proxy": {"port": 9001}, "master": {"port": 1234}},
    )
    env = {"MOONCAKE_CONFIG_PATH": str(path), "MOONCAKE_DEVICE": "mlx5_0"}
    args = make_parser().parse_args(["--proxy-port", "9002", "--model", "x"])
    cfg = config_from_args(args, env=env)
    assert cfg.proxy.port == 9002  # flag beats file
    assert cfg.master.port == 1234  # file kept: no flag given, even though the flag exists
    assert cfg.protocol == "rdma"
    assert cfg.device_name == "mlx5_0"  # env kept
    assert cfg.rpc.max_frame_size == 64 * MiB  # default kept
    assert args.model == "x"


def test_cli_flag_beats_env() -> None:
    args = make_parser().parse_args(["--protocol", "shm", "--master-server-address", "h:1"])
    cfg = config_from_args(args, env={"MOONCAKE_PROTOCOL": "rdma", "MOONCAKE_MASTER": "e:2"})
    assert (cfg.protocol, cfg.master_server_address) == ("shm", "h:1")


def test_cli_boolean_flags() -> None:
    parser = make_parser("transfer")
    env = {"MOONCAKE_TRANSFER_ENABLE_SHM": "false"}
    assert config_from_args(
        parser.parse_args(["--transfer-enable-shm"]), env=env
    ).transfer.enable_shm
    assert not config_from_args(
        parser.parse_args(["--no-transfer-enable-shm"]), env={}
    ).transfer.enable_shm
    assert not config_from_args(parser.parse_args([]), env=env).transfer.enable_shm


def test_cli_config_file_flag(tmp_path: Path) -> None:
    chosen = write(tmp_path / "flag.yaml", {"protocol": "shm"})
    other = write(tmp_path / "env.yaml", {"protocol": "rdma"})
    args = make_parser("protocol").parse_args(["--config-file", str(chosen)])
    assert config_from_args(args, env={"MOONCAKE_CONFIG_PATH": str(other)}).protocol == "shm"
    args = make_parser("protocol").parse_args([])
    assert config_from_args(args, env={"MOONCAKE_CONFIG_PATH": str(other)}).protocol == "rdma"


def test_cli_include_selects_flags() -> None:
    parser = make_parser("proxy", "master.port", "master_server_address")
    help_text = parser.format_help()
    for flag in ("--proxy-port", "--proxy-host", "--master-port", "--master-server-address"):
        assert flag in help_text
    for flag in ("--rpc-max-frame-size", "--master-metrics-port", "--protocol", "--auth-secret"):
        assert flag not in help_text
    with pytest.raises(ConfigError) as info:
        make_parser("rcp")
    assert info.value.key == "rcp" and "rpc" in str(info.value)


def test_cli_help_comes_from_field_metadata() -> None:
    help_text = " ".join(make_parser("rpc", "global_segment_size").format_help().split())
    assert "largest RPC frame accepted or sent" in help_text
    assert "default: 64 MiB; env MOONCAKE_RPC_MAX_FRAME_SIZE" in help_text
    assert "env MOONCAKE_GLOBAL_SEGMENT_SIZE" in help_text


def test_cli_has_no_secret_flag() -> None:
    parser = make_parser()
    assert "--auth-secret" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--auth-secret", "x"])


def test_cli_prefix_avoids_clashes() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default="http")  # the host's own --protocol
    add_config_arguments(parser, ["protocol", "rpc"], prefix="mooncake-")
    args = parser.parse_args(
        ["--protocol", "grpc", "--mooncake-protocol", "rdma", "--mooncake_rpc_request_timeout", "3"]
    )
    cfg = config_from_args(args, env={})
    assert args.protocol == "grpc"
    assert (cfg.protocol, cfg.rpc.request_timeout) == ("rdma", 3.0)


def test_cli_bad_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["--rpc-max-frame-size", "4XB"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--rpc-max-frame-size" in err and "'4GB'" in err


def test_cli_in_a_real_process(tmp_path: Path) -> None:
    """A real program using the helpers: flags parse, bad ones exit 2, file errors surface."""
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """\
            import argparse, json, sys
            from transfer.config import ConfigError, add_config_arguments, config_from_args
            parser = argparse.ArgumentParser(prog="prog")
            add_config_arguments(parser, ["master", "protocol"])
            args = parser.parse_args()
            try:
                cfg = config_from_args(args)
            except ConfigError as exc:
                sys.exit(f"config error: {exc}")
            print(json.dumps(cfg.to_dict()))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOONCAKE_")}
    env["MOONCAKE_AUTH_SECRET"] = SECRET

    def run(*argv: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *argv],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = run("--master_port", "0", "--protocol", "SHM")
    assert ok.returncode == 0, ok.stderr
    dumped = json.loads(ok.stdout)
    assert (dumped["master"]["port"], dumped["protocol"]) == (0, "shm")
    assert dumped["auth_secret"] == "<redacted>" and SECRET not in ok.stdout

    bad = run("--master-port", "65536")
    assert bad.returncode == 2 and "--master-port" in bad.stderr

    bad_file = write(tmp_path / "bad.json", {"protocl": "tcp"})
    failed = run(MOONCAKE_CONFIG_PATH=str(bad_file))
    assert failed.returncode == 1
    assert "did you mean 'protocol'" in failed.stderr and "Traceback" not in failed.stderr
