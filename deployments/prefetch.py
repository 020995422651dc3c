"""Load the next task's model ahead of it (issue 21, item 5): its load overlaps its predecessor's run.

The trigger: a `Queued` task whose `dependant_on` runs here (In Progress, so the task cannot be claimed yet)
and whose model no task of its family deployment is running with. When that deployment has a free replica,
the dispatcher asks it to load the model now (`GenerationDeployment.prefetch`, through the same multiplexed
loader as a generation), so Serve's router sends the task to that replica once it is claimed, and the task's
`timings.load` is ~0 with `model_load.reused` true.

Bounds: at most one prefetch in flight per deployment, once per task; only while the models the
deployment's running tasks use plus this one fit its replicas (a busy replica is never asked, so no model a
running task needs is evicted), and only after the claim (a task that could run now is claimed, not waited
for). Families with a split pool (`deployments.scheduling`) are left out: their capacity spans two pools.
Ray-free: the dispatcher gives it a runner with a `prefetch` method (`deployments.runners.GenerationRunner`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from db.models import Task

logger = logging.getLogger("ray.serve")

# The newest Queued rows looked at per scan (the list is newest first; a chained task is usually recent).
PREFETCH_SCAN = 200
# Scans list Queued rows: at most this often (a Supabase list is an HTTP call), and never more than the claim loop.
PREFETCH_SCAN_INTERVAL_S = 2.0
PREFETCH_TIMEOUT_S = 600.0  # the longest a prefetch may load (a 14B model from a slow disk takes minutes)
# A deployment whose prefetch failed is not asked again for this long (a multi-GPU deployment has no
# `prefetch`: its replicas do not multiplex models, so a load there could not steer routing anyway).
FAILED_BACKOFF_S = 300.0


class PrefetchRunner(Protocol):
    async def prefetch(self, deployment: str, model_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Candidate:
    task_id: str
    deployment: str
    model_id: str


@dataclass(frozen=True)
class DeploymentView:
    """One family deployment as the dispatcher sees it now."""

    capacity: int  # its replicas' slots
    busy: int  # tasks running or waiting on it
    # models its running tasks use (resident on their replicas) and models prefetched for tasks still queued
    held_models: frozenset[str]
    unrouted: bool = False  # a claimed task not routed yet: its model is unknown, so wait


def waiting_on_running(queued: Sequence[Task], running_ids: set[str]) -> list[Task]:
    """The Queued tasks that wait on a task running here, oldest first (`queued` is newest first)."""
    return [task for task in reversed(queued) if task.dependant_on in running_ids]


def choose(
    waiting: Sequence[tuple[Task, str, str]],
    deployments: Mapping[str, DeploymentView],
    prefetching: set[str],
    done: Mapping[str, Candidate],
) -> list[Candidate]:
    """At most one prefetch per deployment: the first waiting task (task, deployment, model id) whose model
    its deployment holds for a task, while the deployment has a free replica and a replica for that model
    beside the models it holds. `prefetching`: deployments with a prefetch in flight; `done`: tasks already
    prefetched."""
    chosen: dict[str, Candidate] = {}
    for task, deployment, model_id in waiting:
        view = deployments.get(deployment)
        if view is None or deployment in chosen or deployment in prefetching or task.id in done:
            continue
        if view.unrouted or view.busy >= view.capacity or model_id in view.held_models:
            continue
        if len(view.held_models) + 1 > view.capacity:  # loading it would evict a model a task needs
            continue
        chosen[deployment] = Candidate(task.id, deployment, model_id)
    return list(chosen.values())


@dataclass
class Prefetcher:
    """The prefetches in flight (one per deployment) and their counters (the dispatcher's status)."""

    runner: PrefetchRunner
    in_flight: dict[str, asyncio.Task] = field(default_factory=dict)  # deployment -> its prefetch
    # what was prefetched per task id, forgotten once the task is no longer queued (claimed, cancelled)
    done: dict[str, Candidate] = field(default_factory=dict)
    started: int = 0
    loaded: int = 0  # the replica really loaded the model (not already resident)
    failed: int = 0
    last_scan: float = float("-inf")
    paused_until: dict[str, float] = field(default_factory=dict)  # deployment -> after a failed prefetch

    def busy(self, deployment: str) -> int:
        """Replicas of `deployment` a prefetch holds (0 or 1)."""
        return int(deployment in self.in_flight)

    def may_ask(self, deployment: str) -> bool:
        """No prefetch in flight on `deployment`, and none failed there lately."""
        paused = self.paused_until.get(deployment, float("-inf")) > time.monotonic()
        return deployment not in self.in_flight and not paused

    def start(self, candidate: Candidate, wake: asyncio.Event) -> None:
        """Run the prefetch in the background; `wake` the claim loop when it ends (its replica is free)."""
        self.started += 1
        self.done[candidate.task_id] = candidate
        logger.info(
            "prefetching %s on %s for task %s", candidate.model_id, candidate.deployment, candidate.task_id
        )
        run = asyncio.get_running_loop().create_task(
            # A load that hangs must not hold the replica's slot for ever: past the deadline it counts as failed.
            asyncio.wait_for(
                self.runner.prefetch(candidate.deployment, candidate.model_id), PREFETCH_TIMEOUT_S
            )
        )
        self.in_flight[candidate.deployment] = run
        run.add_done_callback(lambda finished: self._ended(candidate, finished, wake))

    def _ended(self, candidate: Candidate, run: asyncio.Task, wake: asyncio.Event) -> None:
        if self.in_flight.get(candidate.deployment) is run:
            del self.in_flight[candidate.deployment]
        wake.set()
        if run.cancelled():
            return
        error = run.exception()
        if error is not None:  # only an optimisation: the task loads its model itself when it runs
            self.failed += 1
            self.paused_until[candidate.deployment] = time.monotonic() + FAILED_BACKOFF_S
            logger.warning(
                "prefetching %s for task %s failed: %s", candidate.model_id, candidate.task_id, error
            )
            return
        report = run.result() or {}
        if not report.get("reused", False):
            self.loaded += 1

    def forget_except(self, queued_ids: set[str]) -> None:
        """Keep `done` bounded: drop tasks no longer queued (claimed, cancelled)."""
        self.done = {task_id: c for task_id, c in self.done.items() if task_id in queued_ids}

    def reserved_models(self, deployment: str) -> set[str]:
        """Models prefetched on `deployment` for tasks still queued: no other prefetch may evict them."""
        return {c.model_id for c in self.done.values() if c.deployment == deployment}

    def view(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "loaded": self.loaded,
            "failed": self.failed,
            "in_flight": sorted(self.in_flight),
        }

    async def stop(self) -> None:
        for run in list(self.in_flight.values()):
            run.cancel()
        if self.in_flight:
            await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
