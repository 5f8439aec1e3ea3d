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
