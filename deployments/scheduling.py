"""Scheduling a family's generations between its 1-GPU replicas and its split replicas (Ray-free).

A family deployment with a `split:` entry (deployments/config.py) runs two Serve deployments on disjoint
GPUs: its own replicas, one GPU each, and `<family>-split`, whose replicas each span `gpus_per_replica`
GPUs and split every video across them (`deployments.multi_gpu`). Both take the family's tasks; the
dispatcher claims up to their summed capacity and, when a claimed task gets a slot, `choose_pool` says
which of the two runs it, from the family's queue length (docs/performance.md, "Scheduling on several
GPUs"):

    short queue (waiting <= free split replicas)  -> the split replica: one task runs split, lower latency
    longer queue, a 1-GPU replica free           -> a 1-GPU replica: one task per GPU, higher throughput
    1-GPU replicas all busy, a split one free    -> the split replica: its GPUs would idle otherwise
    nothing free                                 -> wait (no decision)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

REPLICAS = "replicas"
SPLIT = "split"


@dataclass(frozen=True)
class Pool:
    """One Serve deployment serving a family: its name, GPUs per replica, replicas and task slots."""

    deployment: str
    gpus_per_replica: int
    replicas: int
    capacity: int  # tasks it runs at once (replicas x max_ongoing_requests)


@dataclass(frozen=True)
class Decision:
    """Where one task runs, and why."""

    role: str  # REPLICAS or SPLIT
    deployment: str
    reason: str
    waiting: int  # the family's tasks wanting a slot when it was decided, this one included
    free: dict[str, int]  # free slots per role then
    task_id: str | None = None
    at: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "pool": self.role,
            "deployment": self.deployment,
            "reason": self.reason,
            "waiting": self.waiting,
            "free": dict(self.free),
            "at": round(self.at, 3),
        }


def choose_pool(
    waiting: int, replicas: Pool, replicas_busy: int, split: Pool, split_busy: int
) -> Decision | None:
    """The pool the next task of a family runs on, or None when neither has a free slot.

    `waiting`: the family's tasks that want a slot now, this one included (claimed and not yet started,
    plus still Queued in the table). `*_busy`: tasks running on each pool.
    """
    if waiting < 1:
        raise ValueError(f"waiting: at least the task being placed waits, got {waiting}")
    free_replicas = max(0, replicas.capacity - replicas_busy)
    free_split = max(0, split.capacity - split_busy)
    free = {REPLICAS: free_replicas, SPLIT: free_split}
    gpus = f"{split.gpus_per_replica} GPUs"
    if free_split and waiting <= free_split:
        reason = (
            f"latency: {waiting} task(s) waiting, {free_split} split replica slot(s) free: "
            f"it runs split over {gpus}"
        )
        return Decision(SPLIT, split.deployment, reason, waiting, free)
    if free_replicas:
        split_state = f"more than {free_split} free split slot(s)" if free_split else "split replica(s) busy"
        reason = (
            f"throughput: {waiting} task(s) waiting, {split_state}; "
            f"{free_replicas} of {replicas.capacity} 1-GPU slot(s) free"
        )
        return Decision(REPLICAS, replicas.deployment, reason, waiting, free)
    if free_split:
        reason = (
            f"throughput: {waiting} task(s) waiting, every 1-GPU slot busy; the split replica's {gpus} "
            "would idle otherwise"
        )
        return Decision(SPLIT, split.deployment, reason, waiting, free)
    return None


class FamilyScheduler:
    """One family's two pools, the decisions taken for it, and the view `/replicas` shows."""

    def __init__(self, family: str, replicas: Pool, split: Pool):
        self.family = family
        self.pools = {REPLICAS: replicas, SPLIT: split}
        self.last: Decision | None = None
        self.decided: Counter[str] = Counter()

    @property
    def capacity(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())

    def role_of(self, deployment: str) -> str:
        for role, pool in self.pools.items():
            if pool.deployment == deployment:
                return role
        raise KeyError(deployment)

    def decide(self, waiting: int, busy: dict[str, int], task_id: str | None = None) -> Decision | None:
        """`choose_pool` for this family; a decision taken is remembered for the status view."""
        decision = choose_pool(
            waiting,
            self.pools[REPLICAS],
            busy.get(REPLICAS, 0),
            self.pools[SPLIT],
            busy.get(SPLIT, 0),
        )
        if decision is not None:
            decision = replace(decision, task_id=task_id)
            self.last = decision
            self.decided[decision.role] += 1
        return decision

    def view(self, busy: dict[str, int], queued: int) -> dict[str, Any]:
        """Each pool with its replicas and busy/idle slots, the queue, and the last decision."""
        pools = {
            role: {
                "deployment": pool.deployment,
                "gpus_per_replica": pool.gpus_per_replica,
                "replicas": pool.replicas,
                "capacity": pool.capacity,
                "busy": busy.get(role, 0),
                "idle": max(0, pool.capacity - busy.get(role, 0)),
                "decided": self.decided[role],
            }
            for role, pool in self.pools.items()
        }
        return {
            "policy": "queue length: short queue -> split (latency), longer -> 1-GPU replicas (throughput)",
            "pools": pools,
            "queued": queued,
            "last_decision": self.last.view() if self.last else None,
        }
