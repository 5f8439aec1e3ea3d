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
