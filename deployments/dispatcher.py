"""The dispatcher: keeps the tasks table and the runners in step (plain asyncio, no Ray).

It claims claimable rows only up to each capacity pool's free room (a family deployment, the DAG
pool, the utility pool), routes each (`deployments.routing`), runs it through the `Runner` of its
kind, saves the artifact (local first, then upload) and marks the row `Complete`, or `Failed` /
requeued. Meanwhile it writes progress at a bounded rate, heartbeats every in-flight row (and the
rows mirroring an orchestration's steps), requeues rows whose worker died, and on `stop` hands
unfinished rows back to the queue. Every blocking store / storage call runs on its one bounded
thread pool, never on the event loop.

Reliability (docs/reliability.md): a finished artifact is never thrown away because the database or the
disk is briefly away. It is saved (final name, with a receipt: `OutputStorage.find_saved`) before the row
is completed; a storage error the storage calls retryable (full disk, object store away) is retried with
the artifact in memory for up to `storage_retry_s`; `complete` is retried (idempotent, guarded by our
worker id, so it can never complete a row twice) while the database is unavailable, until the heartbeat
finds the row taken or `complete_retry_s` passes; a re-claimed task whose output is already stored
completes without running again. Progress and heartbeat writes that fail are logged and retried, never
fatal. The three loops (claim, heartbeat, maintenance) are supervised: errors are handled per iteration,
a loop that dies is restarted, and `status().problems` names a loop that has not ticked for 3 intervals.

The Ray Serve wiring (`deployments.ingress`) gives it Ray runners; tests give it plain async ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from db.errors import StoreUnavailable
from db.models import Task, TaskStatus
from db.store import TaskStore
from deployments.config import IngressConfig
from deployments.errors import InvalidTask, TaskConflict
from deployments.prefetch import (
    PREFETCH_SCAN,
    PREFETCH_SCAN_INTERVAL_S,
    DeploymentView,
    Prefetcher,
    choose,
    waiting_on_running,
)
from deployments.recovery import identity_of, requeue_predecessors
from deployments.results import task_result
from deployments.routing import Route, Routing
from deployments.scheduling import Decision, FamilyScheduler, StepTicket, task_uses_cfg
from deployments.task_types import DAG_POOL, GENERATION, ORCHESTRATION
from deployments.thumbnail_step import save_thumbnail, stored_thumbnail
from deployments.webhooks import without_delivery_keys
from storage import InputError, OutputStorage, SavedOutput, StorageError
from Wan2GP.artifact import Artifact

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# The pseudo pool a generation counts on while its inputs download (it holds no deployment capacity).
FETCHING_POOL = "Inputs"
# The pseudo pool a generation counts on once its replica handed the frames back (encode, thumbnail, save run
# on CPUs): the deployment's capacity goes to the next task meanwhile (issue 21.5).
CPU_STAGE_POOL = "CPU stage"
# At most this many generations in the CPU stage at once (their frames wait in memory): past it, a finished
# generation keeps its deployment's capacity until it is encoded, as before pipelining.
CPU_STAGE_LIMIT = 8
# How long a progress write may hold up the generation that reports it; a slower write (the database is
# locked) carries on in the background, and later steps are not written until it ends.
PROGRESS_WAIT_S = 1.0
# At stop, after `shutdown_grace_s`: how long runners get to notice they were stopped, and then how long
# the hand-back writes get. Both fit in the deployment's graceful_shutdown_timeout_s margin (app.py).
STOP_NOTICE_S = 2.0
HAND_BACK_S = 6.0
# A loop is unhealthy when it has not completed an iteration for this many of its intervals (at least
# LOOP_SILENCE_FLOOR_S, so a sub-second poll interval does not flap the health check).
LOOP_SILENT_INTERVALS = 3
LOOP_SILENCE_FLOOR_S = 1.0
# Maintenance looks at this many of the newest queued rows for task types nothing here serves.
UNSERVED_SCAN = 1000


class TaskFailure(Exception):
    """A task failed for a reason worth showing its owner; `retryable` requeues it while attempts last."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class RunCancelled(Exception):
    """A runner stopped because its job was cancelled (by the row's owner, or at shutdown)."""


class BlockingPool:
    """One bounded thread pool for every blocking call the dispatcher, the api and the runners make."""

    def __init__(self, max_workers: int = 16):
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hwgp-blocking")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Job:
    """One claimed task as its runner sees it."""

    def __init__(self, dispatcher: Dispatcher, task: Task, pool: str):
        self.task = task
        self.pool = pool  # the capacity pool it counts against
        self.route: Route | None = None
        self.model_id = "?"
        self.cancelled = False  # the row was cancelled (or taken from us): drop the result
        self.released = False  # handed back at shutdown: drop the result, leave the rows for the next run
        self.child_rows: list[str] = []  # rows mirroring an orchestration's steps, heartbeated with it
        self.inputs: dict[str, Any] | None = None  # a generation's params with its inputs' bytes
        self.waiting_for: str | None = None  # inputs fetched, waiting for this deployment's capacity
        # A family with a split pool: which of its two pools runs this job, and why (deployments/scheduling)
        self.decision: Decision | None = None
        self.cfg = True  # whether it runs classifier-free guidance (a cfg split gains nothing otherwise)
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}  # seconds per stage (input_fetch, load, save): the task's result
        # "running" (the runner has it), "encoding" (the replica handed its frames back), "storing" (saving
        # the artifact), "completing" (writing the row):
        # at stop, only running jobs are interrupted; the others have a finished artifact to keep.
        self.phase = "running"
        self._dispatcher = dispatcher
        self._on_cancel: list[Callable[[], None]] = []
        self._last_progress_write = 0.0
        self._progress_write: asyncio.Future | None = None
        self._run_task: asyncio.Task | None = None

    @property
    def dropped(self) -> bool:
        return self.cancelled or self.released

    def on_cancel(self, stop: Callable[[], None]) -> None:
        """Register how to stop the work (a stream's cancel, ray.cancel); called at most once."""
        if self.dropped:
            stop()
        else:
            self._on_cancel.append(stop)

    def watch_rows(self, row_ids: list[str]) -> None:
        self.child_rows = list(row_ids)

    def stop(self, *, release: bool = False) -> None:
        if release:
            self.released = True
        else:
            self.cancelled = True
        stops, self._on_cancel = self._on_cancel, []
        for stop in stops:
            try:
                stop()
            except Exception:  # stopping is best effort: the row's state is what counts
                logger.exception("stopping task %s failed", self.task.id)

    def gpu_done(self) -> None:
        """The replica has handed back its output: count on CPU_STAGE_POOL from now on and wake the claim
        loop, so the deployment takes its next task while this one is encoded and saved. At stop, its
        finished frames are kept like an artifact being stored (phase "encoding": not interrupted)."""
        self.phase = "encoding"
        if self.pool != CPU_STAGE_POOL and self._dispatcher._in_flight_on(CPU_STAGE_POOL) < CPU_STAGE_LIMIT:
            self.pool = CPU_STAGE_POOL
            self._dispatcher._wake.set()

    async def progress(self, step: int, total: int) -> None:
        """Record denoising progress, at most every `progress_interval_s` (and always the last step)."""
        await self._dispatcher._progress(self, step, total)

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call on the dispatcher's pool. A retryable storage error (a full disk, the
        object store away) is retried with backoff for up to `storage_retry_s` (storage writes are
        idempotent), so an orchestration's step outputs wait for space as a task's output does."""
        return await self._dispatcher._retrying(
            self,
            f"{getattr(fn, '__name__', 'a blocking call')}",
            _storage_retryable,
            partial(fn, **kwargs),
            *args,
            within_s=self._dispatcher.settings.storage_retry_s,
        )

    def schedules(self, family: str) -> bool:
        """Whether `family` has a split pool, whose scheduler places this orchestration's steps there."""
        return family in self._dispatcher.schedulers

    def step_ticket(self, family: str, step_id: str, cfg: bool = True) -> StepTicket:
        """A ticket for one of this orchestration's steps on `family` (`schedules(family)`), counted as
        waiting from now on."""
        return self._dispatcher.schedulers[family].ticket(step_id, cfg)

    async def lease_step(self, ticket: StepTicket) -> Decision:
        """Wait until the step's ticket gets a slot (RunCancelled when the job is dropped meanwhile)."""
        return await self._dispatcher._lease_step(self, ticket)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time the block takes to `timings[stage]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class RunResult:
    artifact: Artifact
    model_id: str | None = None  # for metrics
    finish: Callable[[str], None] | None = None  # blocking, idempotent; after the save, before `Complete`


class Runner(Protocol):
    """Produces a job's artifact. Raises TaskFailure (readable, maybe retryable), RunCancelled, or
    anything else (a crashed replica: retryable)."""

    async def run(self, job: Job) -> RunResult: ...


class DispatchMetrics(Protocol):
    def claimed(self, task: Task) -> None: ...
    def completed(self, task: Task, seconds: float, model_id: str) -> None: ...
    def failed(self, task: Task) -> None: ...
    def queue_depth(self, queued: int) -> None: ...
    def in_flight(self, running: int) -> None: ...
    def unserved(self, queued_by_type: dict[str, int]) -> None: ...


class TaskObserver(Protocol):
    """Told, on the event loop, of every row the dispatcher changes and of each denoising step (live
    progress, webhooks). Must not block; an exception is logged and ignored."""

    def task_changed(self, task: Task) -> None: ...
    def task_progress(self, task_id: str, progress: dict[str, Any]) -> None: ...


class NoMetrics:
    def claimed(self, task: Task) -> None: ...
    def completed(self, task: Task, seconds: float, model_id: str) -> None: ...
    def failed(self, task: Task) -> None: ...
    def queue_depth(self, queued: int) -> None: ...
    def in_flight(self, running: int) -> None: ...
    def unserved(self, queued_by_type: dict[str, int]) -> None: ...


@dataclass
class LoopHealth:
    """One background loop as the health check sees it."""

    interval_s: float
    last_tick: float = field(default_factory=time.monotonic)  # end of the last iteration that succeeded
    error: str | None = None  # what the last iteration that failed raised, until one succeeds
    restarts: int = 0

    def silent_for(self) -> float:
        return time.monotonic() - self.last_tick

    def is_silent(self) -> bool:
        return self.silent_for() > max(LOOP_SILENT_INTERVALS * self.interval_s, LOOP_SILENCE_FLOOR_S)


@dataclass(frozen=True)
class DispatcherStatus:
    """A read-only view for health checks."""

    worker_id: str
    running: bool
    problems: list[str]
    in_flight: dict[str, int]
    capacity: dict[str, int]
    in_flight_ids: list[str] = field(default_factory=list)
    loops: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> silent_s, error, restarts
    unserved: dict[str, int] = field(default_factory=dict)  # queued task types nothing here serves
    # family -> its pools (busy/idle), queue and the policy's last decision (families with a split pool)
    scheduling: dict[str, dict[str, Any]] = field(default_factory=dict)
    # models loaded ahead of their task (deployments/prefetch): started, loaded, failed, in_flight
    prefetch: dict[str, Any] = field(default_factory=dict)


def new_worker_id() -> str:
    """A worker id for a dispatcher not given one (the ingress gives a stable one: deployments/recovery)."""
    return f"ingress-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def failure_message(error: InvalidTask) -> str:
    """A `Failed` row's message for a task routing refused."""
    return error.problem if error.field == "params" else str(error)


def _storage_retryable(error: Exception) -> bool:
    return isinstance(error, StorageError) and error.retryable


def _store_retryable(error: Exception) -> bool:
    return isinstance(error, StoreUnavailable)


class Dispatcher:
    def __init__(
        self,
        store: TaskStore,
        storage: OutputStorage,
        routing: Routing,
        runners: dict[str, Runner],
        capacity: dict[str, int],
        settings: IngressConfig | None = None,
        *,
        pool: BlockingPool | None = None,
        metrics: DispatchMetrics | None = None,
        worker_id: str | None = None,
        observers: Sequence[TaskObserver] = (),
        schedulers: dict[str, FamilyScheduler] | None = None,
        prefetch_deployments: Collection[str] | None = None,
    ):
        """`runners`: route kind (generation / orchestration / utility) -> runner. `capacity`: how many
        tasks may run at once per pool of `routing.pools()`; a pool left out is not claimed from.
        `worker_id` of the form IDENTITY/INCARNATION (`deployments.recovery.new_worker_id`) also takes
        back, at the first maintenance, the rows an earlier incarnation left behind. `schedulers`: family
        -> how its tasks are shared between its 1-GPU and split pools (its capacity covers both).
        `prefetch_deployments`: the deployments whose replicas can load a model ahead (`prefetch`; multi-GPU
        replicas cannot); None: every one."""
        self.store = store
        self.storage = storage
        self.routing = routing
        self.runners = runners
        self.settings = settings or IngressConfig()
        self.pools = {name: types for name, types in routing.pools().items() if name in capacity}
        self.capacity = {name: capacity[name] for name in self.pools}
        self._owns_pool = pool is None
        self.pool = pool or BlockingPool(self.settings.threads)
        self.metrics: DispatchMetrics = metrics or NoMetrics()
        self.worker_id = worker_id or new_worker_id()
        self.observers = list(observers)
        self.served_task_types = {t for types in self.pools.values() for t in types}
        self.in_flight: dict[str, Job] = {}
        self.unserved: dict[str, int] = {}
        self.stopping = False
        self._recovered = identity_of(self.worker_id) is None  # nothing to take back without an identity
        self._wake = asyncio.Event()
        self._loop_steps: dict[str, tuple[Callable[[], Awaitable[bool]], float]] = {
            "claim": (self._claim_step, self.settings.poll_interval_s),
            "heartbeat": (self._heartbeat_step, self.settings.heartbeat_interval_s),
            "maintenance": (self._maintenance_step, self.maintenance_interval_s),
        }
        self.loops: dict[str, LoopHealth] = {}
        self._loops: dict[str, asyncio.Task] = {}
        self._runs: set[asyncio.Task] = set()
        self._reserved: dict[str, int] = {}  # pool -> slots a claim in progress may fill
        self.schedulers = {name: s for name, s in (schedulers or {}).items() if name in self.pools}
        self._queued: dict[str, int] = {}  # family with a split pool -> Queued rows at the last claim
        # Models loaded ahead of a task waiting on a running one, when the generation runner can
        generation_runner = runners.get(GENERATION)
        self.prefetch_deployments = None if prefetch_deployments is None else set(prefetch_deployments)
        self.prefetcher = (
            Prefetcher(generation_runner) if hasattr(generation_runner, "prefetch") else None  # type: ignore[arg-type]
        )

    @property
    def maintenance_interval_s(self) -> float:
        return max(1.0, min(10.0, self.settings.stale_after_s / 4))

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim, heartbeat and maintenance loops on the running event loop."""
        for name, (_, interval_s) in self._loop_steps.items():
            self.loops[name] = LoopHealth(interval_s)
            self._start_loop(name)

    def wake(self) -> None:
        """Look for work now (a task was just queued)."""
        self._wake.set()

    def stop_task(self, task_id: str) -> bool:
        """Stop a task running here because its row was cancelled; False when it does not run here."""
        job = self.in_flight.get(task_id)
        if job is None:
            return False
        job.stop()
        return True

    def status(self) -> DispatcherStatus:
        problems = []
        if self.stopping:
            problems.append("stopping: in-flight tasks are finishing or being handed back")
        else:
            for name, health in self.loops.items():
                if health.is_silent():
                    problems.append(
                        f"{name} loop has not ticked for {health.silent_for():.1f} s "
                        f"(interval {health.interval_s:g} s): {health.error or 'iteration still running'}"
                    )
        return DispatcherStatus(
            worker_id=self.worker_id,
            running=bool(self._loops) and not self.stopping,
            problems=problems,
            in_flight={name: self._in_flight_on(name) for name in self.pools},
            capacity=dict(self.capacity),
            in_flight_ids=list(self.in_flight),
            loops={
                name: {"silent_s": round(h.silent_for(), 3), "error": h.error, "restarts": h.restarts}
                for name, h in self.loops.items()
            },
            unserved=dict(self.unserved),
            scheduling={
                family: scheduler.view(self._busy_by_role(family), self._queued.get(family, 0))
                for family, scheduler in self.schedulers.items()
            },
            prefetch=self.prefetcher.view() if self.prefetcher is not None else {},
        )

    async def stop(self) -> None:
        """Graceful shutdown: stop claiming, give in-flight work `shutdown_grace_s` to finish, then hand
        every task still running back (`Queued`, attempt refunded, nothing recorded). A task whose artifact
        is already being stored or completed gets `HAND_BACK_S` more to finish that instead."""
        self.stopping = True
        self._wake.set()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self.in_flight.values()):
            if job.phase == "running":
                job.stop(release=True)  # its run hands the row back (`_hand_back`)
        if self._runs:
            await asyncio.wait(self._runs, timeout=STOP_NOTICE_S)
        for job in list(self.in_flight.values()):
            if job.phase == "running" and job._run_task is not None:
                job._run_task.cancel()  # a runner that ignored the stop: its run hands the row back
        if self._runs:
            await asyncio.wait(self._runs, timeout=HAND_BACK_S)
        for run in list(self._runs):  # a store write still retrying: the row is left for recovery
            run.cancel()
        if self._runs:
            await asyncio.wait(self._runs, timeout=1.0)
        if self.prefetcher is not None:
            await self.prefetcher.stop()
        for loop in self._loops.values():
            loop.cancel()
        await asyncio.gather(*self._loops.values(), return_exceptions=True)
        if self._owns_pool:  # a pool given to us is closed by whoever made it
            self.pool.close()

    # --- supervised loops ------------------------------------------------------------------------

    def _start_loop(self, name: str) -> None:
        loop = asyncio.get_running_loop().create_task(self._supervised(name), name=f"hwgp-{name}-loop")
        self._loops[name] = loop
        loop.add_done_callback(partial(self._loop_ended, name))

    def _loop_ended(self, name: str, loop: asyncio.Task) -> None:
        """A loop only ends at stop; one that died otherwise (cancelled by accident, a BaseException) is
        restarted."""
        if self.stopping:
            return
        reason = "cancelled" if loop.cancelled() else repr(loop.exception() or "returned")
        health = self.loops[name]
        health.restarts += 1
        health.error = f"loop died ({reason}); restarted"
        logger.error("%s loop died (%s); restarting it (restart %d)", name, reason, health.restarts)
        self._start_loop(name)

    async def _supervised(self, name: str) -> None:
        """Run one loop's step every interval; an error ends the iteration, never the loop. The claim loop
        ends when stopping begins; heartbeat and maintenance go on until `stop` has handed work back."""
        step, interval_s = self._loop_steps[name]
        health = self.loops[name]
        while not (self.stopping and name == "claim"):
            try:
                more = await step()
            except Exception as error:
                health.error = f"{type(error).__name__}: {error}"
                logger.warning("%s loop iteration failed: %s", name, health.error, exc_info=True)
                await asyncio.sleep(interval_s)
                continue
            health.last_tick = time.monotonic()
            health.error = None
            if more:
                continue
            if name == "claim":  # woken early when a task is queued or a run ends
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=interval_s)
                self._wake.clear()
            else:
                await asyncio.sleep(interval_s)

    async def _claim_step(self) -> bool:
        return await self.claim() > 0

    async def _heartbeat_step(self) -> bool:
        await self.heartbeat()
        return False

    async def _maintenance_step(self) -> bool:
        await self.maintenance()
        return False

    # --- the loops' steps ------------------------------------------------------------------------

    def _in_flight_on(self, pool: str) -> int:
        return sum(1 for job in self.in_flight.values() if job.pool == pool)

    async def maintenance(self) -> None:
        """Take back rows a killed predecessor left (once), requeue rows whose worker died, count (or,
        with `fail_unknown_task_types`, fail) queued rows nobody here serves, report the queue depth."""
        if not self._recovered:
            await self.pool.run(
                requeue_predecessors,
                self.store,
                self.worker_id,
                silent_for_s=3 * self.settings.heartbeat_interval_s,
            )
            self._recovered = True
        changed = await self.pool.run(
            self.store.requeue_stale, self.settings.stale_after_s, self.settings.max_attempts
        )
        for task in changed:
            logger.warning(
                "task %s -> %s (%s)", task.id, task.status.value, task.error_message or task.progress_message
            )
            self._notify(task)
        queued = await self.pool.run(self.store.list, status=TaskStatus.QUEUED, limit=UNSERVED_SCAN)
        unserved = [
            task
            for task in queued
            if task.task_type not in self.served_task_types and not self.routing.is_managed(task.task_type)
        ]
        if self.settings.fail_unknown_task_types:
            for task in unserved:
                message = (
                    f"task_type {task.task_type!r} is not served by this application; "
                    f"served: {', '.join(sorted(self.served_task_types))}"
                )
                self._notify(await self.pool.run(self.store.fail, task.id, message))
                self.metrics.failed(task)
            unserved = []
        self.unserved = dict(Counter(task.task_type for task in unserved))
        self.metrics.unserved(self.unserved)
        counts = await self.pool.run(self.store.count_by_status, sorted(self.served_task_types))
        self.metrics.queue_depth(counts[TaskStatus.QUEUED])

    async def claim(self) -> int:
        """Claim up to each pool's free capacity and start running what was claimed."""
        claimed = 0
        for pool, task_types in self.pools.items():
            free = self.capacity[pool] - self._in_flight_on(pool) - self._waiting_on(pool)
            if pool in self.schedulers:  # orchestration steps holding slots of the family
                free -= sum(self.schedulers[pool].leased.values())
            if self.prefetcher is not None:  # a replica loading a model ahead is busy meanwhile
                free -= self.prefetcher.busy(pool)
            if pool in self.routing.deployments and not self._may_fetch_more():
                free = 0
            if free <= 0 or self.stopping:
                continue
            self._reserved[pool] = free  # a generation done fetching must not take these slots meanwhile
            try:
                tasks = await self.pool.run(self.store.claim_next, self.worker_id, task_types, free)
            finally:
                self._reserved.pop(pool, None)
            for task in tasks:
                self.metrics.claimed(task)
                earlier = self.in_flight.get(task.id)
                if earlier is not None:  # requeued under us (stale during an outage) and claimed again
                    earlier.stop()
                self._notify(task)
                job = Job(self, without_delivery_keys(task), pool)  # runners never see webhook_url
                self.in_flight[task.id] = job
                job._run_task = run = asyncio.get_running_loop().create_task(self._run(job))
                self._runs.add(run)
                run.add_done_callback(self._runs.discard)
            claimed += len(tasks)
        for family in self.schedulers:  # the queue length its scheduler decides by (after this claim)
            counts = await self.pool.run(self.store.count_by_status, self.pools[family])
            self._queued[family] = counts[TaskStatus.QUEUED]
        self.metrics.in_flight(len(self.in_flight))
        if self.prefetcher is not None and not self.stopping:
            await self._prefetch()
        return claimed

    async def _prefetch(self) -> None:
        """Start loading the model of a Queued task waiting on a task running here, on a free replica of
        its family (deployments/prefetch). At most one scan per poll interval, and only when a deployment
        could take a prefetch and something runs here to wait on."""
        prefetcher = self.prefetcher
        assert prefetcher is not None
        now = time.monotonic()
        names = [
            name
            for name in self.routing.deployments
            if name in self.capacity
            and name not in self.schedulers
            and (self.prefetch_deployments is None or name in self.prefetch_deployments)
            and prefetcher.may_ask(name)
        ]
        # An orchestration's steps use the family replicas unseen by the counts here: no prefetch meanwhile
        # (it could evict the model of its next step).
        orchestrating = any(
            job.pool == DAG_POOL or (job.route is not None and job.route.kind == ORCHESTRATION)
            for job in self.in_flight.values()
        )
        if (
            not self.in_flight
            or orchestrating
            or now - prefetcher.last_scan < max(self.settings.poll_interval_s, PREFETCH_SCAN_INTERVAL_S)
            or not any(self._deployment_view(name).busy < self.capacity[name] for name in names)
        ):
            return
        prefetcher.last_scan = now
        queued = await self.pool.run(self.store.list, status=TaskStatus.QUEUED, limit=PREFETCH_SCAN)
        prefetcher.forget_except({task.id for task in queued})
        waiting = []
        for task in waiting_on_running(queued, set(self.in_flight)):
            if task.task_type not in self.served_task_types or task.id in prefetcher.done:
                continue
            try:
                route = await self.pool.run(self.routing.route, task.task_type, task.params)
            except InvalidTask:  # it fails when claimed; nothing to load for it
                continue
            if route.kind == GENERATION and route.model_id:
                waiting.append((task, route.pool, route.model_id))
        views = {name: self._deployment_view(name) for name in names}  # after the awaits above
        for candidate in choose(waiting, views, set(prefetcher.in_flight), prefetcher.done):
            prefetcher.start(candidate, self._wake)

    def _deployment_view(self, deployment: str) -> DeploymentView:
        """A deployment's replicas and the tasks that hold or will soon need one of them (claimed, fetching
        inputs, running; not those in the CPU stage, whose replica is free again)."""
        jobs = [
            job
            for job in self.in_flight.values()
            if job.pool != CPU_STAGE_POOL
            and (job.pool == deployment if job.route is None else job.route.pool == deployment)
        ]
        return DeploymentView(
            capacity=self.capacity[deployment],
            busy=len(jobs),
            held_models=frozenset(
                {job.model_id for job in jobs if job.route is not None}
                | (self.prefetcher.reserved_models(deployment) if self.prefetcher is not None else set())
            ),
            unrouted=any(job.route is None for job in jobs),
        )

    async def heartbeat(self) -> None:
        """Heartbeat every in-flight row and its mirror rows; stop a task whose row is no longer ours.
        Every row is tried; then the iteration fails (and the loop does not tick) if any write failed."""
        failures = []
        for job in list(self.in_flight.values()):
            for row_id in [job.task.id, *job.child_rows]:  # only rows In Progress for us are touched
                try:
                    alive = await self.pool.run(self.store.heartbeat, row_id, self.worker_id)
                except Exception as error:  # retried at the next beat; the run carries on
                    failures.append(f"{row_id}: {type(error).__name__}: {error}")
                    continue
                if row_id == job.task.id and not alive:  # cancelled or requeued: stop the generation
                    job.stop()
                    break
        if failures:
            raise StoreUnavailable(f"{len(failures)} heartbeat write(s) failed; first: {failures[0]}")

    # --- one task --------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        """Produce the task's artifact on its route, store it, complete the row; or fail / requeue it."""
        task = job.task
        try:
            try:
                job.route = await self.pool.run(self.routing.route, task.task_type, task.params)
            except InvalidTask as error:
                raise TaskFailure(failure_message(error)) from None
            job.pool = job.route.pool  # a re-routed generation counts on the deployment it really runs on
            job.model_id = job.route.model_id or task.task_type
            if job.route.kind != ORCHESTRATION:  # an orchestration resumes its own rows instead
                saved = await self.pool.run(self.storage.find_saved, task.id)
                if saved is not None:  # an earlier attempt stored it, then could not complete the row
                    logger.info("task %s: output already stored at %s", task.id, saved.output_location)
                    thumbnail_url = await self.pool.run(stored_thumbnail, self.storage, task.id)
                    await self._complete(job, saved, None, thumbnail_url)
                    return
            if job.route.kind == GENERATION:
                if job.route.pool in self.schedulers:  # a cfg split gains nothing without CFG
                    job.cfg = await self.pool.run(task_uses_cfg, self.routing, task.task_type, task.params)
                await self._fetch_inputs(job)
            result = await self.runners[job.route.kind].run(job)
            if job.dropped:
                raise RunCancelled
            if job.decision is not None:  # the task's result says which pool ran it, and why
                result.artifact.metadata["scheduling"] = job.decision.placement()
            # --- thumbnail (issue 20): stored beside the output; its location goes in the artifact's
            # metadata and, by `_complete`, into the task's params as the original does ---
            thumbnail_url = await self.pool.run(save_thumbnail, self.storage, task.id, result.artifact)
            # ---
            with job.timed("save"):
                saved = await self._save(job, result.artifact)
            if result.finish is not None:
                await self._retrying(job, "finishing", _store_retryable, result.finish, saved.output_location)
            await self._complete(
                job, saved, task_result(task, result.artifact, saved.uploaded, job.timings), thumbnail_url
            )
            self.metrics.completed(task, time.monotonic() - job.started, result.model_id or job.model_id)
        except TaskFailure as failure:
            await self._fail(job, str(failure), retryable=failure.retryable)
        except (asyncio.CancelledError, RunCancelled, TaskConflict):
            if not job.cancelled:  # we are shutting down: give the task back
                await self._hand_back(job)
        except StoreUnavailable as error:  # the database stayed away past every retry
            logger.error(
                "task %s: the database stayed unavailable (%s); the row is left In Progress for the stale "
                "requeue or the next start, and a stored output completes it without running again",
                task.id,
                error,
            )
        except Exception as error:  # the replica died or the cluster lost it: the task may run again
            logger.warning("task %s: %s: %s", task.id, type(error).__name__, error)
            # The owner sees what kind of fault it was; the details (node, process) are in the log above.
            await self._fail(job, f"replica error: {type(error).__name__}", retryable=True)
        finally:
            if self.in_flight.get(task.id) is job:  # not a newer claim of the same row
                del self.in_flight[task.id]
            self.metrics.in_flight(len(self.in_flight))
            self._wake.set()

    # --- inputs before capacity (issue 16.4) ------------------------------------------------------

    def _waiting_on(self, pool: str) -> int:
        return sum(1 for job in self.in_flight.values() if job.waiting_for == pool)

    def _may_fetch_more(self) -> bool:
        return self._in_flight_on(FETCHING_POOL) < self.settings.max_waiting_for_inputs

    async def _fetch_inputs(self, job: Job) -> None:
        """Download a generation's inputs without holding its deployment's capacity, then wait for it.

        While downloading the job counts on FETCHING_POOL (claims of that deployment go on; at most
        `max_waiting_for_inputs` jobs fetch at once); cancelling the task aborts the downloads.
        """
        assert job.route is not None
        deployment = job.pool
        job.pool = FETCHING_POOL
        cancel = threading.Event()
        job.on_cancel(cancel.set)
        try:
            with job.timed("input_fetch"):
                job.inputs = await self.routing.fetch_inputs(
                    job.task.params, job.route.task_type.input_fields, cancel=cancel
                )
        except InputError as error:
            raise (RunCancelled() if job.dropped else TaskFailure(str(error))) from None
        job.waiting_for = deployment
        capacity = self.capacity.get(deployment)
        while capacity is not None and not self._place(job, deployment, capacity):
            if job.dropped:
                raise RunCancelled
            await asyncio.sleep(0.05)
        job.pool, job.waiting_for = deployment, None

    # --- two pools of one family (deployments/scheduling.py) --------------------------------------

    def _place(self, job: Job, deployment: str, capacity: int) -> bool:
        """Whether the job may start now on `deployment`; for a family with a split pool, also which of
        its pools runs it (`job.decision`). Synchronous: no other job is placed in between."""
        if self._in_flight_on(deployment) + self._reserved.get(deployment, 0) >= capacity:
            return False
        scheduler = self.schedulers.get(deployment)
        if scheduler is None:
            return True
        # This job, the family's other claimed jobs not started yet, and its rows still Queued (the
        # scheduler adds the orchestration steps waiting).
        waiting = 1 + self._tasks_waiting(deployment, besides=job)
        job.decision = scheduler.decide(waiting, self._busy_by_role(deployment), job.task.id, job.cfg)
        return job.decision is not None

    def _tasks_waiting(self, family: str, besides: Job | None = None) -> int:
        """The family's tasks wanting a slot: its rows still Queued and its claimed jobs not placed yet."""
        claimed = sum(
            1
            for other in self.in_flight.values()
            if other is not besides and other.decision is None and self._family_of(other) == family
        )
        return self._queued.get(family, 0) + claimed

    async def _lease_step(self, job: Job, ticket: StepTicket) -> Decision:
        """An orchestration step's slot: tried now and every 50 ms, as a generation waits in `_fetch_inputs`
        (the ticket already counts as waiting, so tasks placed meanwhile see it)."""
        family = ticket.scheduler.family
        while True:
            if job.dropped:
                ticket.release()
                raise RunCancelled
            decision = ticket.lease(self._tasks_waiting(family), self._busy_by_role(family))
            if decision is not None:
                return decision
            await asyncio.sleep(0.05)

    def _family_of(self, job: Job) -> str | None:
        """The family deployment a generation job runs on (before routing: the pool it was claimed on)."""
        if job.route is not None:
            return job.route.pool if job.route.kind == GENERATION else None
        return job.pool

    def _busy_by_role(self, family: str) -> dict[str, int]:
        busy: Counter[str] = Counter()
        for job in self.in_flight.values():
            if job.pool == family and job.decision is not None:
                busy[job.decision.role] += 1
        return dict(busy)

    async def _save(self, job: Job, artifact: Artifact) -> SavedOutput:
        """Store the artifact under its final name, retrying a retryable storage error (full disk, object
        store away) with the artifact in memory for up to `storage_retry_s`."""
        job.phase = "storing"
        try:
            return await self._retrying(
                job,
                "storing the output",
                _storage_retryable,
                self.storage.save,
                job.task.id,
                artifact,
                within_s=self.settings.storage_retry_s,
            )
        except StorageError as error:
            raise TaskFailure(f"storing the output failed: {error}", retryable=error.retryable) from None

    async def _complete(
        self, job: Job, saved: SavedOutput, result: dict[str, Any] | None, thumbnail_url: str | None = None
    ) -> None:
        """Mark the row `Complete` (with `thumbnail_url` written into its params by the same write),
        retrying while the database is unavailable. Idempotent and guarded by our worker id: a retry
        after a lost reply is recognised, and a row taken from us is never completed (TaskConflict)."""
        job.phase = "completing"
        done = await self._retrying(
            job,
            "completing the row",
            _store_retryable,
            self.store.complete_idempotent,
            job.task.id,
            saved.output_location,
            self.worker_id,
            result,
            thumbnail_url,
            within_s=self.settings.complete_retry_s,
        )
        self._notify(done)

    async def _retrying(
        self,
        job: Job,
        what: str,
        retryable: Callable[[Exception], bool],
        fn: Callable[..., T],
        *args: Any,
        within_s: float | None = None,
    ) -> T:
        """`fn(*args)` on the pool, retried with backoff (0.25 s doubling to 10 s) while its error is
        `retryable`, the row is still ours (the heartbeat has not found it taken) and `within_s` (default
        `complete_retry_s`) has not passed. Raises the last error, or RunCancelled when the row was taken."""
        deadline = time.monotonic() + (self.settings.complete_retry_s if within_s is None else within_s)
        delay = 0.25
        while True:
            try:
                return await self.pool.run(fn, *args)
            except Exception as error:
                if not retryable(error):
                    raise
                if job.cancelled:
                    raise RunCancelled from error
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("task %s: %s failed, retrying in %.2f s: %s", job.task.id, what, delay, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _hand_back(self, job: Job) -> None:
        """Release the row to `Queued` without spending an attempt (we are stopping)."""
        reason = f"requeued: {self.worker_id} shut down"
        try:
            await self._retrying(
                job, "handing the task back", _store_retryable, self.store.release, job.task.id,
                self.worker_id, reason, within_s=HAND_BACK_S,
            )  # fmt: skip
        except StoreUnavailable as error:
            logger.error(
                "task %s could not be handed back (%s); the next start (recovery) or the stale requeue "
                "takes it back",
                job.task.id,
                error,
            )

    async def _fail(self, job: Job, message: str, retryable: bool) -> None:
        try:
            task = await self._retrying(
                job,
                "recording the failure",
                _store_retryable,
                partial(
                    self.store.fail,
                    worker_id=self.worker_id,
                    retryable=retryable,
                    max_attempts=self.settings.max_attempts,
                ),
                job.task.id,
                message,
            )
        except (TaskConflict, RunCancelled):
            return  # cancelled or requeued meanwhile: nothing of ours to record
        except StoreUnavailable as error:
            logger.error(
                "task %s: recording %r failed: %s; the stale requeue retries it", job.task.id, message, error
            )
            return
        self._notify(task)
        if task.status == TaskStatus.FAILED:
            self.metrics.failed(job.task)

    async def _progress(self, job: Job, step: int, total: int) -> None:
        """Write progress (a heartbeat too) without ever failing or long stalling the run: a write that
        fails is logged and the next step writes again; a slow one finishes in the background."""
        now = time.monotonic()
        eta = (now - job.started) / max(step, 1) * (total - step)
        # Denoising is most of the work; decoding and saving come after the last step.
        fraction = min(0.99, step / max(total, 1))
        message = f"step {step}/{total}, ETA {eta:.0f} s"
        progress = {
            "step": step,
            "total": total,
            "progress": fraction,
            "eta_s": round(eta, 2),
            "message": message,
        }
        for observer in self.observers:  # every step (in-process listeners are cheap); the row less often
            self._tell(observer.task_progress, job.task.id, progress)
        if now - job._last_progress_write < self.settings.progress_interval_s and step < total:
            return
        if job._progress_write is not None and not job._progress_write.done():
            return  # the previous write is still waiting for the database
        job._last_progress_write = now
        write = asyncio.ensure_future(
            self.pool.run(self.store.set_progress, job.task.id, self.worker_id, fraction, message)
        )
        job._progress_write = write
        write.add_done_callback(partial(self._progress_written, job))
        await asyncio.wait([write], timeout=PROGRESS_WAIT_S)

    def _progress_written(self, job: Job, write: asyncio.Future) -> None:
        if write.cancelled():
            return
        error = write.exception()
        if error is not None:
            job._last_progress_write = 0.0  # write again at the next step
            logger.warning("task %s: progress write failed (written again later): %s", job.task.id, error)
        elif write.result() is False:  # the row is no longer ours: cancelled or requeued
            job.stop()

    def _notify(self, task: Task) -> None:
        for observer in self.observers:
            self._tell(observer.task_changed, task)

    @staticmethod
    def _tell(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # an observer's bug must not fail the task
            logger.exception("task observer %r failed", hook)
