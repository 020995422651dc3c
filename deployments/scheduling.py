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

A `cfg` split gains nothing on a task without classifier-free guidance (every phase's guidance <= 1:
distilled / LightX2V presets): the pipeline then makes one prediction per step and both ranks compute
it (`Wan2GP.parallel._CfgSplit`), so one GPU only repeats the other's work. Such a task prefers a free
1-GPU replica and takes the split pool only when none is free. Ulysses splits gain on any task.

Orchestration steps (travel segments, joins, inpaints) are placed by the same policy from the
dispatcher's process: a step asks for a `StepTicket` (it counts as waiting from then on), leases a slot
when one is free (counted busy, as a task's is) and releases it when its Ray task returns. A chained
travel asks for one segment at a time, so with the split pool free each runs split (latency); an
independent travel asks for all its segments at once, a burst that spreads over both pools.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from Wan2GP.catalog import ModelDefinition
from Wan2GP.params import BaseParams
from Wan2GP.phases import phase_spec

if TYPE_CHECKING:
    from deployments.routing import Routing

logger = logging.getLogger("ray.serve")

REPLICAS = "replicas"
SPLIT = "split"


@dataclass(frozen=True)
class Pool:
    """One Serve deployment serving a family: its name, GPUs per replica, replicas and task slots."""

    deployment: str
    gpus_per_replica: int
    replicas: int
    capacity: int  # tasks it runs at once (replicas x max_ongoing_requests)
    parallel_mode: str | None = None  # a split pool's mode ("cfg", "ulysses", "cfg+ulysses")


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

    def placement(self) -> dict[str, str]:
        """What a task's (or a step row's) result records as `scheduling`."""
        return {"deployment": self.deployment, "pool": self.role, "reason": self.reason}


def phase_guidance(definition: ModelDefinition, params: BaseParams) -> list[float]:
    """The guidance scale of each denoising phase a generation runs with: the task's, else its LoRA
    presets', else the model's (the merge `Engine._settings` makes, without resolving LoRA files)."""
    guidance = params.guidance_scale
    if guidance is None:
        guidance = definition.defaults.guidance_scale
        flags = [("causvid", params.use_causvid_lora), ("lighti2x", params.use_lighti2x_lora)]
        flags.append(("in_scene", bool(getattr(params, "in_scene", False))))
        for name, enabled in flags:
            if enabled and definition.builtin_lora(name) is None:  # a built-in LoRA: the model's defaults
                guidance = float(definition.preset(name).settings.get("guidance_scale", guidance))
    return list(phase_spec(definition, params, guidance).guidance)


def uses_cfg(guidance: Sequence[float]) -> bool:
    """Whether any phase runs classifier-free guidance (diffusers' Wan pipelines: guidance > 1)."""
    return any(scale > 1.0 for scale in guidance)


def task_uses_cfg(routing: Routing, task_type: str, params: dict[str, Any]) -> bool:
    """Whether a generation (or an orchestration's step) runs classifier-free guidance; True when that
    cannot be told (bad params fail the task on their own, naming the field)."""
    try:
        parsed, definition = routing.parse(task_type, params)
    except Exception as error:
        logger.debug("%s: guidance unknown (%s); placed as a CFG task", task_type, error)
        return True
    return uses_cfg(phase_guidance(definition, parsed))


def choose_pool(
    waiting: int, replicas: Pool, replicas_busy: int, split: Pool, split_busy: int, cfg: bool = True
) -> Decision | None:
    """The pool the next task of a family runs on, or None when neither has a free slot.

    `waiting`: the family's tasks (and orchestration steps) that want a slot now, this one included
    (claimed and not yet started, plus still Queued in the table). `*_busy`: tasks and steps running on
    each pool. `cfg`: whether the task runs classifier-free guidance (`uses_cfg`).
    """
    if waiting < 1:
        raise ValueError(f"waiting: at least the task being placed waits, got {waiting}")
    free_replicas = max(0, replicas.capacity - replicas_busy)
    free_split = max(0, split.capacity - split_busy)
    free = {REPLICAS: free_replicas, SPLIT: free_split}
    gpus = f"{split.gpus_per_replica} GPUs"
    if not cfg and split.parallel_mode == "cfg":
        return _without_cfg(waiting, replicas, free_replicas, split, free_split, free)
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


def _without_cfg(
    waiting: int, replicas: Pool, free_replicas: int, split: Pool, free_split: int, free: dict[str, int]
) -> Decision | None:
    """A task without CFG when the split pool splits CFG: a 1-GPU replica if one is free."""
    if free_replicas:
        reason = (
            "no CFG: a cfg split would waste one GPU (both ranks compute the same prediction); "
            f"{free_replicas} of {replicas.capacity} 1-GPU slot(s) free"
        )
        return Decision(REPLICAS, replicas.deployment, reason, waiting, free)
    if free_split:
        reason = (
            "no CFG, every 1-GPU slot busy: the cfg split replica runs it (one of its GPUs repeats the "
            "other's work)"
        )
        return Decision(SPLIT, split.deployment, reason, waiting, free)
    return None


class FamilyScheduler:
    """One family's two pools, the decisions taken for it, its orchestration steps' leases, and the view
    `/replicas` shows.

    The dispatcher counts its own tasks (claimed, running) and hands those counts to `decide`; the
    scheduler adds the steps it knows of: those waiting for a slot (`StepTicket`s not leased yet) and
    those holding one (leased, not released), so a task and a step never both see one slot free.
    """

    def __init__(self, family: str, replicas: Pool, split: Pool):
        self.family = family
        self.pools = {REPLICAS: replicas, SPLIT: split}
        self.last: Decision | None = None
        self.decided: Counter[str] = Counter()
        self.steps_waiting = 0  # tickets not leased yet
        self.leased: Counter[str] = Counter()  # role -> steps holding a slot there

    @property
    def capacity(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())

    def role_of(self, deployment: str) -> str:
        for role, pool in self.pools.items():
            if pool.deployment == deployment:
                return role
        raise KeyError(deployment)

    def busy(self, tasks_busy: dict[str, int]) -> dict[str, int]:
        """Busy slots per role: the dispatcher's running tasks plus the leased steps."""
        return {role: tasks_busy.get(role, 0) + self.leased[role] for role in self.pools}

    def decide(
        self, waiting: int, busy: dict[str, int], task_id: str | None = None, cfg: bool = True
    ) -> Decision | None:
        """`choose_pool` for this family; a decision taken is remembered for the status view.

        `waiting` and `busy`: the dispatcher's tasks (waiting: this one included when it is a task); the
        steps waiting and leased are added here."""
        busy = self.busy(busy)
        decision = choose_pool(
            waiting + self.steps_waiting,
            self.pools[REPLICAS],
            busy[REPLICAS],
            self.pools[SPLIT],
            busy[SPLIT],
            cfg,
        )
        if decision is not None:
            decision = replace(decision, task_id=task_id)
            self.last = decision
            self.decided[decision.role] += 1
        return decision

    def ticket(self, step_id: str, cfg: bool = True) -> StepTicket:
        """An orchestration step that wants a slot: it counts as waiting until it leases or is released."""
        self.steps_waiting += 1
        return StepTicket(self, step_id, cfg)

    def view(self, busy: dict[str, int], queued: int) -> dict[str, Any]:
        """Each pool with its replicas and busy/idle slots (tasks and steps), the queue (Queued rows, and
        steps waiting for a slot) and the last decision."""
        busy = self.busy(busy)
        pools = {
            role: {
                "deployment": pool.deployment,
                "gpus_per_replica": pool.gpus_per_replica,
                "parallel_mode": pool.parallel_mode,
                "replicas": pool.replicas,
                "capacity": pool.capacity,
                "busy": busy[role],
                "steps": self.leased[role],
                "idle": max(0, pool.capacity - busy[role]),
                "decided": self.decided[role],
            }
            for role, pool in self.pools.items()
        }
        return {
            "policy": (
                "queue length: short queue -> split (latency), longer -> 1-GPU replicas (throughput); "
                "no CFG on a cfg split -> 1-GPU replicas first"
            ),
            "pools": pools,
            "queued": queued,
            "steps_waiting": self.steps_waiting,
            "last_decision": self.last.view() if self.last else None,
        }


class StepTicket:
    """One orchestration step's claim on a slot of its family: waiting, then leased, then released.

    `lease` tries to place it (None: nothing free, try again later); `release` returns the slot, or
    withdraws a ticket never leased. Both are idempotent; the dispatcher's event loop is their only
    caller, so no locking.
    """

    def __init__(self, scheduler: FamilyScheduler, step_id: str, cfg: bool):
        self.scheduler = scheduler
        self.step_id = step_id
        self.cfg = cfg
        self.decision: Decision | None = None
        self.released = False

    def lease(self, tasks_waiting: int, tasks_busy: dict[str, int]) -> Decision | None:
        """Place the step now if a slot is free. `tasks_waiting`: the dispatcher's tasks wanting a slot
        of this family (claimed or Queued); `tasks_busy`: its tasks running per role."""
        if self.released:
            raise RuntimeError(f"step {self.step_id}: its ticket was released")
        if self.decision is not None:
            return self.decision
        decision = self.scheduler.decide(tasks_waiting, tasks_busy, self.step_id, self.cfg)
        if decision is not None:
            self.decision = decision
            self.scheduler.steps_waiting -= 1
            self.scheduler.leased[decision.role] += 1
        return decision

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.decision is None:
            self.scheduler.steps_waiting -= 1
        else:
            self.scheduler.leased[self.decision.role] -= 1
