"""The chaos benchmark's short version (bench/chaos.py): replica kills, a database lock held past the
store's busy timeout, and a full storage disk, on SQLite.

Tiny tasks go through the running service while a driver `ray.kill`s random family replicas, holds
SQLite's write lock and fills the storage tmpfs; afterwards nothing may be lost, completed twice or
stuck, and every task that did not complete says why.
"""

from __future__ import annotations

import pytest

from bench.chaos import run_chaos, table

pytestmark = pytest.mark.slow


def test_short_chaos_run_loses_nothing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a cluster of its own, never one `ray start` left running
    result = run_chaos(
        tasks=14,
        duration=35,
        faults=["kill", "lock", "disk"],
        settle=90,
        stale_after_s=8,
        lock=(6, 8),
        disk_hold=6,
        fault_every=(3, 6),
        seed=1,
        busy_timeout_s=2,  # each 6-8 s lock is an outage to every write, not just a wait
    )
    report = table(result) + "\n" + "\n".join(result.fault_log + result.problems)
    print(report)
    assert sum(result.faults.values()) >= 3, report  # the faults really happened
    assert all(result.faults[kind] >= 1 for kind in ("kill", "lock", "disk")), report
    assert result.total("tasks") == 14, report
    assert (result.total("lost"), result.total("double"), result.total("stuck")) == (0, 0, 0), report
    assert result.total("no_reason") == 0, report
    assert result.total("complete") + result.total("failed") == 14, report
