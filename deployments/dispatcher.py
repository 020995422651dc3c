"""The dispatcher: keeps the tasks table and the runners in step (plain asyncio, no Ray).

It claims claimable rows only up to each capacity pool's free room (a family deployment, the DAG
pool, the utility pool), routes each (`deployments.routing`), runs it through the `Runner` of its
kind, saves the artifact (local first, then upload) and marks the row `Complete`, or `Failed` /
requeued. Meanwhile it writes progress at a bounded rate, heartbeats every in-flight row (and the
rows mirroring an orchestration's steps), requeues rows whose worker died, and on `stop` hands
unfinished rows back to the queue. Every blocking store / storage call runs on its one bounded
thread pool, never on the event loop.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from db.models import Task, TaskStatus
from db.store import TaskStore
from deployments.config import IngressConfig
from deployments.errors import InvalidTask, TaskConflict
from deployments.results import task_result
from deployments.routing import Route, Routing
from deployments.task_types import GENERATION
from deployments.thumbnail_step import save_thumbnail
from deployments.webhooks import without_delivery_keys
from storage import InputError, OutputStorage, StorageError
from Wan2GP.artifact import Artifact

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# The pseudo pool a generation counts on while its inputs download (it holds no deployment capacity).
FETCHING_POOL = "Inputs"


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
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}  # seconds per stage (input_fetch, load, save): the task's result
        self._dispatcher = dispatcher
        self._on_cancel: list[Callable[[], None]] = []
        self._last_progress_write = 0.0

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

    async def progress(self, step: int, total: int) -> None:
        """Record denoising progress, at most every `progress_interval_s` (and always the last step)."""
        await self._dispatcher._progress(self, step, total)

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._dispatcher.pool.run(fn, *args, **kwargs)

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
    finish: Callable[[str], None] | None = None  # blocking; after the artifact is saved, before `Complete`


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


@dataclass(frozen=True)
class DispatcherStatus:
    """A read-only view for health checks."""

    worker_id: str
    running: bool
    problems: list[str]
    in_flight: dict[str, int]
    capacity: dict[str, int]
    in_flight_ids: list[str] = field(default_factory=list)


def new_worker_id() -> str:
    """This process's name in the rows it claims."""
    return f"ingress-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def failure_message(error: InvalidTask) -> str:
    """A `Failed` row's message for a task routing refused."""
    return error.problem if error.field == "params" else str(error)


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
    ):
        """`runners`: route kind (generation / orchestration / utility) -> runner. `capacity`: how many
        tasks may run at once per pool of `routing.pools()`; a pool left out is not claimed from."""
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
        self.stopping = False
        self.loop_error: str | None = None
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._runs: set[asyncio.Task] = set()
        self._reserved: dict[str, int] = {}  # pool -> slots a claim in progress may fill

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim loop and the heartbeat loop on the running event loop."""
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._sync_loop()), loop.create_task(self._heartbeat_loop())]

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
        if self._loops and self._loops[0].done():
            problems.append(f"sync loop stopped: {self.loop_error or 'finished'}")
        return DispatcherStatus(
            worker_id=self.worker_id,
            running=bool(self._loops) and not any(loop.done() for loop in self._loops),
            problems=problems,
            in_flight={name: self._in_flight_on(name) for name in self.pools},
            capacity=dict(self.capacity),
            in_flight_ids=list(self.in_flight),
        )

    async def stop(self) -> None:
        """Graceful shutdown: stop claiming, let in-flight work finish, give the rest back."""
        self.stopping = True
        self._wake.set()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self.in_flight.values()):
            job.stop(release=True)
            await self.pool.run(
                self.store.release, job.task.id, self.worker_id, f"requeued: {self.worker_id} shut down"
            )
        if self._runs:
            await asyncio.wait(self._runs, timeout=5)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._owns_pool:  # a pool given to us is closed by whoever made it
            self.pool.close()

    # --- loops -----------------------------------------------------------------------------------

    def _in_flight_on(self, pool: str) -> int:
        return sum(1 for job in self.in_flight.values() if job.pool == pool)

    async def _sync_loop(self) -> None:
        maintenance_every = max(1.0, min(10.0, self.settings.stale_after_s / 4))
        last_maintenance = 0.0
        while not self.stopping:
            try:
                if time.monotonic() - last_maintenance > maintenance_every:
                    await self.maintenance()
                    last_maintenance = time.monotonic()
                claimed = await self.claim()
                self.loop_error = None
                if not claimed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_interval_s)
                    self._wake.clear()
            except Exception as error:  # keep the loop alive through a database hiccup
                self.loop_error = f"{type(error).__name__}: {error}"
                logger.exception("sync loop iteration failed")
                await asyncio.sleep(self.settings.poll_interval_s)

    async def maintenance(self) -> None:
        """Requeue rows whose worker died; fail queued rows nobody serves; report the queue depth."""
        changed = await self.pool.run(
            self.store.requeue_stale, self.settings.stale_after_s, self.settings.max_attempts
        )
        for task in changed:
            logger.warning(
                "task %s -> %s (%s)", task.id, task.status.value, task.error_message or task.progress_message
            )
            self._notify(task)
        if self.settings.fail_unknown_task_types:
            queued = await self.pool.run(self.store.list, status=TaskStatus.QUEUED, limit=1000)
            for task in queued:
                if task.task_type not in self.served_task_types and not self.routing.is_managed(
                    task.task_type
                ):
                    message = (
                        f"task_type {task.task_type!r} is not served by this application; "
                        f"served: {', '.join(sorted(self.served_task_types))}"
                    )
                    self._notify(await self.pool.run(self.store.fail, task.id, message))
                    self.metrics.failed(task)
        counts = await self.pool.run(self.store.count_by_status, sorted(self.served_task_types))
        self.metrics.queue_depth(counts[TaskStatus.QUEUED])

    async def claim(self) -> int:
        """Claim up to each pool's free capacity and start running what was claimed."""
        claimed = 0
        for pool, task_types in self.pools.items():
            free = self.capacity[pool] - self._in_flight_on(pool) - self._waiting_on(pool)
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
                self._notify(task)
                job = Job(self, without_delivery_keys(task), pool)  # runners never see webhook_url
                self.in_flight[task.id] = job
                run = asyncio.get_running_loop().create_task(self._run(job))
                self._runs.add(run)
                run.add_done_callback(self._runs.discard)
            claimed += len(tasks)
        self.metrics.in_flight(len(self.in_flight))
        return claimed

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
            if job.route.kind == GENERATION:
                await self._fetch_inputs(job)
            result = await self.runners[job.route.kind].run(job)
            if job.dropped:
                raise RunCancelled
            # --- thumbnail (issue 20): stored beside the output, `thumbnail_url` in its metadata ---
            await self.pool.run(save_thumbnail, self.storage, task.id, result.artifact)
            # ---
            try:
                with job.timed("save"):
                    saved = await self.pool.run(self.storage.save, task.id, result.artifact)
            except StorageError as error:
                raise TaskFailure(f"storing the output failed: {error}") from None
            if result.finish is not None:
                await self.pool.run(result.finish, saved.output_location)
            report = task_result(task, result.artifact, saved.uploaded, job.timings)
            done = await self.pool.run(
                self.store.complete, task.id, saved.output_location, self.worker_id, report
            )
            self._notify(done)
            self.metrics.completed(task, time.monotonic() - job.started, result.model_id or job.model_id)
        except TaskFailure as failure:
            await self._fail(job, str(failure), retryable=failure.retryable)
        except (asyncio.CancelledError, RunCancelled, TaskConflict):
            if not job.cancelled:  # we are shutting down: give the task back
                await self.pool.run(
                    self.store.release, task.id, self.worker_id, f"requeued: {self.worker_id} shut down"
                )
        except Exception as error:  # the replica died or the cluster lost it: the task may run again
            logger.warning("task %s: %s: %s", task.id, type(error).__name__, error)
            # The owner sees what kind of fault it was; the details (node, process) are in the log above.
            await self._fail(job, f"replica error: {type(error).__name__}", retryable=True)
        finally:
            self.in_flight.pop(task.id, None)
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
        while capacity is not None and (
            self._in_flight_on(deployment) + self._reserved.get(deployment, 0) >= capacity
        ):
            if job.dropped:
                raise RunCancelled
            await asyncio.sleep(0.05)
        job.pool, job.waiting_for = deployment, None

    async def _fail(self, job: Job, message: str, retryable: bool) -> None:
        try:
            task = await self.pool.run(
                self.store.fail,
                job.task.id,
                message,
                worker_id=self.worker_id,
                retryable=retryable,
                max_attempts=self.settings.max_attempts,
            )
        except TaskConflict:
            return  # cancelled or requeued meanwhile: nothing of ours to record
        self._notify(task)
        if task.status == TaskStatus.FAILED:
            self.metrics.failed(job.task)

    async def _progress(self, job: Job, step: int, total: int) -> None:
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
        job._last_progress_write = now
        still_ours = await self.pool.run(
            self.store.set_progress, job.task.id, self.worker_id, fraction, message
        )
        if not still_ours:
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

    async def _heartbeat_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Heartbeat every in-flight row and its mirror rows; stop a task whose row is no longer ours."""
        for job in list(self.in_flight.values()):
            try:
                alive = await self.pool.run(self.store.heartbeat, job.task.id, self.worker_id)
            except Exception:
                logger.exception("heartbeat for %s failed", job.task.id)
                continue
            if not alive:  # cancelled (or requeued by another ingress): stop the generation
                job.stop()
            for row_id in job.child_rows:  # only rows In Progress for us are touched
                await self.pool.run(self.store.heartbeat, row_id, self.worker_id)
