"""Prefill/transfer/decode models; the online prefill fit converges from the prior."""
from __future__ import annotations

import random

import pytest

from scheduler.policy import ConductorError, DecodeModel, PrefillModel, TransferModel


def test_prior_is_the_paper_model():
    m = PrefillModel()
    assert m.predict(10_000, 0) == pytest.approx(1.16e-4 * 1e4 + 7.1e-10 * 1e8)
    assert m.predict(10_000, 10_000) == 0.0
    assert m.predict(10_000, 4_000) < m.predict(10_000, 0)


def test_online_fit_moves_to_observed_engine():
    m = PrefillModel(prior_weight=2.0)
    rng = random.Random(1)
    a, b = 3e-4, 2e-9  # a slower engine than the prior
    for _ in range(300):
        n = rng.randint(500, 30_000)
        p = rng.randint(0, n - 1)
        m.observe(n, p, a * (n - p) + b * (n * n - p * p))
    for n, p in ((2_000, 0), (16_000, 4_000), (30_000, 0)):
        truth = a * (n - p) + b * (n * n - p * p)
        assert m.predict(n, p) == pytest.approx(truth, rel=0.06)
    prior = PrefillModel()
    assert abs(prior.predict(16_000, 0) - (a * 16e3 + b * 16e3**2)) > 1.0  # the fit mattered
    assert m.observations == 300


def test_fit_ignores_garbage_and_stays_non_negative():
    m = PrefillModel()
    m.observe(1000, 0, float("nan"))
    m.observe(1000, 0, -1.0)
    m.observe(0, 0, 1.0)
    assert m.observations == 0
    for _ in range(50):
        m.observe(20_000, 0, 0.0)  # an engine that claims zero time
    la, qb = m.coefficients
    assert la >= 0 and qb >= 0
    with pytest.raises(ConductorError):
        PrefillModel(prior_weight=0)


def test_transfer_congestion_and_decode_step():
    t = TransferModel(kv_bytes_per_token=1000, block_tokens=10, latency_s=0.0)
    assert t.seconds(0, 1e6) == 0.0
    assert t.seconds(10, 1e6) == pytest.approx(0.1)
    assert t.seconds(10, 1e6, concurrent_sends=3) == pytest.approx(0.4)
    d = DecodeModel(base_s=0.01, per_seq_s=0.001, per_token_s=1e-6)
    assert d.step_seconds(0, 0) == 0.0
    assert d.step_seconds(4, 1000) == pytest.approx(0.01 + 0.004 + 0.001)
