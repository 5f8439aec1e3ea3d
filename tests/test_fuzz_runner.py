"""The bulk fuzz runner (``benchmarks/fuzz_all.py``) counts every case and every violation,
whether it checks cases one at a time or in lanes, and draws the same cases either way (so a
seed found by a run in lanes replays with ``--lanes 1``)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter

import pytest
from hypothesis import strategies as st

from _fuzz import FuzzHang, FuzzViolation, Harness

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import fuzz_all  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class _Recording(Harness):
    """Checks integers: multiples of 7 "hang", other multiples of 5 "crash"; records each case
    and how many checks ran at once."""

    lanes = 4

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()

    def check(self, case: int) -> None:
        with self.lock:
            self.seen.append(case)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(0.005)  # a case that waits, like a live server's
            if case % 7 == 0:
                raise FuzzHang(f"case {case}")
            if case % 5 == 0:
                raise FuzzViolation(f"case {case}")
        finally:
            with self.lock:
                self.active -= 1


def _run(lanes: int) -> tuple[dict, _Recording]:
    h = _Recording()
    stats = fuzz_all.run_target("recording", lambda: contextlib.nullcontext(h),
                                lambda _: st.integers(0, 10_000), cases=150, seconds=None,
                                run_seed=11, lanes=lanes)
    return stats, h


@pytest.mark.parametrize("lanes", [1, 4])
def test_every_case_and_violation_is_counted(lanes):
    stats, h = _run(lanes)
    assert stats["cases"] == len(h.seen) == 150
    assert stats["hangs"] == sum(c % 7 == 0 for c in h.seen)
    assert stats["crashes"] == sum(c % 7 != 0 and c % 5 == 0 for c in h.seen)
    assert stats["lanes"] == lanes and stats["serves_after"]
    assert (h.most_active > 1) == (lanes > 1)


def test_lanes_check_the_same_cases_as_one_at_a_time():
    _, serial = _run(1)
    _, parallel = _run(4)
    assert Counter(serial.seen) == Counter(parallel.seen)


def test_rss_profile_tells_growth_from_a_plateau():
    """A decoder keeping 1 KiB per case grows by half its total over the second half; one that
    stops allocating after 1,000 cases does not grow there at all, transients aside."""
    linear = [(n, (100 << 20) + n * 1024) for n in range(0, 10_001, 200)]
    plateau = [(n, (100 << 20) + min(n, 1000) * 1024 + (30 << 20) * (n == 9800))
               for n in range(0, 10_001, 200)]
    grows, flat = fuzz_all.rss_profile(linear), fuzz_all.rss_profile(plateau)
    # Medians over the 5% of the cases up to each point: 800, 4,800 and 9,800 cases.
    assert grows["rss_mb_at"] == {"10%": 100.8, "50%": 104.7, "100%": 109.6}
    assert grows["rss_growth_second_half_mb"] == 4.9
    assert grows["rss_peak_mb"] == 109.8 and grows["rss_peak_at_cases"] == 10_000
    assert flat["rss_mb_at"] == {"10%": 100.8, "50%": 101.0, "100%": 101.0}
    assert flat["rss_growth_second_half_mb"] == 0.0
    assert flat["rss_peak_mb"] == 131.0 and flat["rss_peak_at_cases"] == 9800  # the transient
    assert len(grows["rss_mb_series"]) == 21
    assert grows["rss_mb_series"][0] == [0, 100.0] and grows["rss_mb_series"][-1] == [10_000, 109.6]


class _Growing(_Recording):
    """Its "decoder process" keeps 10 KiB per case checked."""

    def rss(self) -> int:
        return (50 << 20) + len(self.seen) * 10240


def test_a_run_samples_the_decoders_rss_through_the_run(monkeypatch):
    monkeypatch.setattr(fuzz_all, "RSS_EVERY", 50)
    h = _Growing()
    stats = fuzz_all.run_target("growing", lambda: contextlib.nullcontext(h),
                                lambda _: st.integers(0, 10_000), cases=1000, seconds=None,
                                run_seed=3, lanes=4)
    assert stats["cases"] == 1000
    assert stats["rss_peak_mb"] == round(50 + 10_000 / 1024, 1)
    assert 0 <= stats["rss_peak_mb"] - stats["rss_mb_at"]["100%"] < 0.6
    assert 4.0 < stats["rss_growth_second_half_mb"] < 5.5
    assert 0.5 < stats["rss_mb_at"]["10%"] - 50 < 1.5
