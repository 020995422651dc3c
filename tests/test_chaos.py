"""The chaos benchmark's short version (bench/chaos.py): replica kills and a database lock, SQLite.

Tiny tasks go through the running service while a driver `ray.kill`s random family replicas and holds
SQLite's write lock; afterwards nothing may be lost, completed twice or stuck, and every task that did
not complete says why.
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
        faults=["kill", "lock"],
        settle=90,
        stale_after_s=8,
        lock=(6, 8),
        fault_every=(3, 6),
        seed=1,
    )
    report = table(result) + "\n" + "\n".join(result.fault_log + result.problems)
    print(report)
    assert sum(result.faults.values()) >= 3, report  # the faults really happened
    assert result.faults["kill"] >= 1 and result.faults["lock"] >= 1, report
    assert result.total("tasks") == 14, report
    assert (result.total("lost"), result.total("double"), result.total("stuck")) == (0, 0, 0), report
    assert result.total("no_reason") == 0, report
    assert result.total("complete") + result.total("failed") == 14, report
