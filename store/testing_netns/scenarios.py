"""The store fault scenarios of issue #10, each returning its figures as a dict.

Shared by ``tests/test_faults_store_netns.py`` (small sizes, properties asserted) and
``benchmarks/fault_bench.py`` (full sizes, figures printed): the same code decides what a
failure, a corrupt byte or a recovery time is in both.

* :func:`node_fault` - a store node killed (``kill -9``) or cut off (link down, process alive)
  during a mixed workload with ``replica_num=2``; then reclaim of its space, and for a cut node,
  what happens when its link comes back (stale copies must not be served).
* :func:`master_failover` - the master leader killed with standbys; kill -> first good op.
* :func:`slow_path` - every client-to-node data path through relays adding delay and resets,
  against a clean run of the same workload.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from . import StoreLab, Worker

__all__ = ["master_failover", "node_fault", "slow_path"]

Log = Callable[[str], None]
SIZES = [512, 4096, 32768]


def _quiet(_: str) -> None:
    pass


def _wait_progress(worker: Worker, done: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.call("progress")["done"] < done:
        if time.monotonic() > deadline:
            raise TimeoutError(f"workload did not reach {done} ops in {timeout}s")
        time.sleep(0.01)


def _wait_segments(worker: Worker, count: int, timeout: float) -> float | None:
    """Seconds until the master reports ``count`` segments, or None if it does not in time."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if worker.call("stats")["segments"] == count:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _surviving(worker: Worker, failed: list[list[str]]) -> list[list[str]]:
    """The failed gets whose key the master still lists: it had a readable replica."""
    if not failed:
        return []
    exists = worker.call("exists", keys=[k for k, _ in failed])["exists"]
    return [f for f, e in zip(failed, exists) if e]


def node_fault(kind: str, *, ops: int = 3000, fault_at: float = 0.3, ttl: float = 2.0,
               bait: int = 30, seed: int = 1, log: Log = _quiet) -> dict[str, Any]:
    """``kind`` is ``"kill"`` or ``"cut"``. Figures: the workload's counts, failed gets of keys
    that still had a replica, corrupt bytes, reclaim time against the TTL, the final check of
    every committed key and (cut) of every replica after the node came back."""
    if kind not in ("kill", "cut"):
        raise ValueError("kind is 'kill' or 'cut'")
    with StoreLab(nodes=3, masters=1, clients=1, client_ttl=ttl) as lab:
        w = lab.worker()
        segment_bytes = w.call("stats")["capacity"] // 3
        # Bait: keys on every node, overwritten (same size, other bytes) while the victim is
        # away; its old copies must never be served again.
        w.call("put", prefix="bait/", n=bait, size=4096, version=1)
        w.call("start", ops=ops, seed=seed, sizes=SIZES)
        _wait_progress(w, int(ops * fault_at))
        t_fault = time.monotonic()
        if kind == "kill":
            lab.node_procs[0].kill9()
        else:
            lab.node_hosts[0].link_down()
        log(f"{kind} of node {lab.node_segments[0]} at op {w.call('progress')['done']}")
        reclaim = _wait_segments(w, 2, ttl * 5 + 10)
        reclaim_s = None if reclaim is None else time.monotonic() - t_fault
        stats = w.call("stats")
        figures: dict[str, Any] = {
            "scenario": f"node_{kind}", "ttl_s": ttl, "reclaim_s": reclaim_s,
            "capacity_after": stats["capacity"], "capacity_expected": 2 * segment_bytes,
            "segments_after": stats["segments"], "evicted_objects": stats["evicted_objects"]}
        run = w.call("wait", timeout=600)
        log(f"workload: {run['ops']} ops in {run['elapsed']:.1f}s")
        if kind == "cut":
            w.call("put", prefix="bait/", n=bait, size=4096, version=2, overwrite=True)
            t_up = time.monotonic()
            lab.node_hosts[0].link_up()
            back = _wait_segments(w, 3, ttl * 5 + 10)
            figures["readmitted"] = back is not None
            figures["readmit_s"] = None if back is None else time.monotonic() - t_up
        verify = w.call("verify", timeout=300)
        copies = w.call("replicas", timeout=300)
        figures.update({
            "ops": run["ops"], "elapsed_s": run["elapsed"], "puts_ok": run["puts_ok"],
            "puts_failed": run["puts_failed"], "gets_ok": run["gets_ok"],
            "gets_failed": len(run["gets_failed"]),
            "failed_gets_surviving": len(_surviving(w, run["gets_failed"])),
            "failed_gets_sample": run["gets_failed"][:3], "overwrites": run["overwrites"],
            "corrupt_gets": run["corrupt"], "corrupt_bytes": run["corrupt_bytes"],
            "verified": verify["checked"], "verify_failed": verify["failed"][:5],
            "verify_failed_n": len(verify["failed"]), "verify_missing_n": len(verify["missing"]),
            "verify_corrupt": verify["corrupt"], "replica_copies": copies["copies"],
            "stale_copies": copies["stale"][:5], "stale_copies_n": len(copies["stale"]),
            "unreadable_copies_n": len(copies["unreadable"])})
        w.stop()
        return figures


def master_failover(*, trials: int = 1, masters: int = 2, objects: int = 200,
                    ttl: float = 2.0, lease_ttl: float = 1.0, log: Log = _quiet
                    ) -> dict[str, Any]:
    """Kill -9 the leader ``trials`` times (the killed one restarts as a standby). Figures:
    kill -> first successful put+get per trial, kill -> every committed object readable again,
    and objects lost (committed before the kill, holders alive, unreadable after 30 s)."""
    with StoreLab(nodes=3, masters=masters, clients=1, client_ttl=ttl,
                  leader_lease_ttl=lease_ttl) as lab:
        w = lab.worker()
        recovery, rebuilt, lost, corrupt = [], [], 0, 0
        for trial in range(trials):
            w.call("put", prefix=f"t{trial}/", n=objects, size=4096, version=trial)
            old = lab.leader()
            t_kill = time.monotonic()
            lab.master_procs[old].kill9()
            probe = w.call("probe", timeout=70, within=60)
            recovery.append(probe["ok_at"] - t_kill)
            deadline = t_kill + 30
            while True:
                v = w.call("verify", timeout=120)
                if not (v["failed"] or v["missing"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            rebuilt.append(time.monotonic() - t_kill)
            lost += len(v["failed"]) + len(v["missing"])
            corrupt += v["corrupt"]
            new = lab.leader()
            log(f"trial {trial}: leader {old} -> {new}, first op after {recovery[-1]:.2f}s, "
                f"all {v['checked']} objects after {rebuilt[-1]:.2f}s")
            if new == old:
                raise RuntimeError("the killed master is still the leader")
            lab.restart_master(old)
        w.stop()
        return {"scenario": "master_failover", "trials": trials, "masters": masters,
                "lease_ttl_s": lease_ttl, "objects_committed": objects * trials,
                "recovery_s": recovery, "recovery_p50_s": statistics.median(recovery),
                "recovery_max_s": max(recovery), "all_readable_s": rebuilt,
                "objects_lost": lost, "corrupt": corrupt}


def slow_path(*, ops: int = 300, delay_ms: float = 50.0, reset_fraction: float = 0.01,
              reset_per_mib: float = 0.0, seed: int = 1, log: Log = _quiet) -> dict[str, Any]:
    """The same workload twice: direct, then with every client-to-node data path through a
    relay (``delay_ms`` each way, resets). Figures: both runs' rates, failures and corruption,
    and the relays' counters."""
    with StoreLab(nodes=3, masters=1, clients=1, relay=True) as lab:
        runs = {}
        for name in ("clean", "relay"):
            if name == "relay":
                lab.route_via_relays("--delay-ms", str(delay_ms), "--reset-fraction",
                                     str(reset_fraction), "--reset-per-mib",
                                     str(reset_per_mib), "--seed", str(seed))
            w = lab.worker()  # a fresh engine: it reads the (rewritten) descriptors anew
            w.call("put", prefix=f"{name}-warm/", n=10, size=4096)  # connections, descriptors
            w.call("start", ops=ops, seed=seed, sizes=SIZES, prefix=f"{name}/")
            run = w.call("wait", timeout=600)
            verify = w.call("verify", timeout=300)
            moved = run["bytes_put"] + run["bytes_got"]
            runs[name] = {
                "ops": run["ops"], "elapsed_s": run["elapsed"],
                "ops_per_s": run["ops"] / run["elapsed"],
                "mib_per_s": moved / run["elapsed"] / (1 << 20),
                "puts_failed": run["puts_failed"], "gets_failed": len(run["gets_failed"]),
                "corrupt_bytes": run["corrupt_bytes"], "verified": verify["checked"],
                "verify_failed_n": len(verify["failed"]) + len(verify["missing"]),
                "verify_corrupt": verify["corrupt"]}
            log(f"{name}: {runs[name]['ops_per_s']:.0f} ops/s")
            w.stop()
        counters = [r.stats() for r in lab.relays]
        total = {k: sum(c[k] for c in counters) for k in counters[0]}
        return {"scenario": "slow_path", "delay_ms": delay_ms, "reset_fraction": reset_fraction,
                "reset_per_mib": reset_per_mib, **runs, "relays": total,
                "slowdown": runs["clean"]["ops_per_s"] / runs["relay"]["ops_per_s"]}
