"""Property-based fuzzing of the decoders that need no server: segment descriptors (from peers,
etcd and the HTTP server), P2P object records and progress entries (from the metadata store),
and config files. Each must refuse bad input with its documented error type only."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from _fuzz import _config_harness, _descriptor_harness, _record_harness
from _fuzz import config_cases, descriptor_cases, record_cases

pytestmark = pytest.mark.timeout(60)
CI = settings(max_examples=400, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@CI
@given(case=descriptor_cases)
def test_descriptor_decoder_raises_only_descriptor_error(case):
    with _descriptor_harness() as h:
        h.check(case)


@CI
@given(case=record_cases)
def test_p2p_record_decoders_raise_only_record_error(case):
    with _record_harness() as h:
        h.check(case)


@settings(CI, max_examples=150)
@given(case=config_cases)
def test_config_files_raise_only_config_error(case):
    with _config_harness() as h:
        h.check(case)


@pytest.mark.parametrize("raw", [b"[" * 5000, b"a: " + b"{" * 3000, b"[\n" * 5000])
def test_deep_yaml_flow_nesting_is_refused_where_it_starts(tmp_path, raw):
    """Found by the long config run: PyYAML's scanner rescans every open ``[`` for each token,
    so a 5 KB line of them cost over a second before a RecursionError refused it. The loader now
    stops at the 65th open flow collection, and says where."""
    from transfer.config import ConfigError, load_config
    from transfer.config.loader import MAX_YAML_FLOW_DEPTH

    path = tmp_path / "deep.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_YAML_FLOW_DEPTH} levels"):
        load_config(path, env={})


def test_yaml_flow_nesting_up_to_the_limit_still_loads(tmp_path):
    from transfer.config.loader import MAX_YAML_FLOW_DEPTH, read_config_file

    depth = MAX_YAML_FLOW_DEPTH
    path = tmp_path / "ok.yaml"
    path.write_text("a: " + "[" * depth + "]" * depth)
    value = read_config_file(path)["a"]
    for _ in range(depth - 1):
        value = value[0]
    assert value == []
