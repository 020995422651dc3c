"""The ingress: the HTTP API and the loop that keeps the tasks table and the family deployments in sync.

It is the only deployment that touches the tasks table and storage. The sync loop claims claimable
tasks only up to the free capacity of the deployment each routes to, streams each through a
`DeploymentHandle` (progress events, then the artifact), saves the artifact (local first, then
upload) and marks the row `Complete` or `Failed`.
"""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from dag.orchestrations import ORCHESTRATIONS
from dag.steps import StepFailed
from dag.utility_tasks import UTILITY_INPUT_FIELDS, utility_node, validate_utility
from db.models import Task, TaskStatus
from db.store import InvalidTask, TaskConflict, TaskNotFound, TaskStore, new_task, open_store
from deployments.config import (
    DEPLOYMENT_TASK_TYPES,
    FAMILY_DEPLOYMENT,
    MANAGED_TASK_TYPES,
    ORCHESTRATION,
    ORCHESTRATION_TASK_TYPES,
    UTILITY,
    UTILITY_TASK_TYPES,
    AppConfig,
)
from deployments.generation import describe_validation_error
from deployments.recovery import new_worker_id, requeue_predecessors, stable_identity
from storage import InputError, InputFetcher, OutputStorage, StorageError
from Wan2GP.artifact import Artifact
from Wan2GP.catalog import Catalog, ModelDefinition
from Wan2GP.engine import resolve_model
from Wan2GP.errors import EngineError
from Wan2GP.params import parse_params

logger = logging.getLogger("ray.serve")

# Params that name input files. The ingress fetches them (URL, output location, allowed local path)
# and hands the replica their bytes, so a replica on another node needs no shared filesystem.
INPUT_FIELDS = ("image_start", "image_end", "video_guide", "video_mask", "image_url", "image_refs")
VIDEO_FIELDS = ("video_guide", "video_mask")


def _without_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """Params with input references swapped for small blank images, to validate and route a task
    without fetching its inputs (they are fetched once, when it runs)."""
    blank = np.zeros((16, 16, 3), dtype=np.uint8)
    swapped = dict(params)
    for name in INPUT_FIELDS:
        value = params.get(name)
        if value is None:
            continue
        if name in VIDEO_FIELDS:
            swapped[name] = blank[None]
        elif isinstance(value, list):
            swapped[name] = [blank for _ in value]
        else:
            swapped[name] = blank
    return swapped


app = FastAPI(
    title="Headless-Wan2GP Serve",
    description="Queue video and image generation tasks; the tasks table is the source of truth.",
    version="0.1.0",
)


class CreateTaskRequest(BaseModel):
    """POST /tasks body. Unknown keys inside `params` are kept; known ones are validated."""

    task_type: str = Field(examples=["t2v"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"prompt": "a cat", "model": "tiny-t2v"}])
    dependant_on: str | None = None
    project_id: str | None = None
    priority: int = 0
    task_id: str | None = Field(default=None, description="Client-chosen id (a UUID); generated when absent.")


class TaskFailure(Exception):
    """A task failed for a reason worth showing its owner."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class InFlight:
    task: Task
    deployment: str  # a family deployment, or ORCHESTRATION / UTILITY
    model_id: str = "?"
    on_cancel: Callable[[], None] | None = None  # stops the generation / DAG / Ray task
    cancelled: bool = False  # the row was cancelled: drop the result
    child_rows: list[str] = field(default_factory=list)  # rows mirroring an orchestration's steps
    started: float = field(default_factory=time.monotonic)
    last_progress_write: float = 0.0


@app.middleware("http")
async def limit_request_size(request: Request, call_next):
    """Refuse an oversized body (a 10 MB prompt) before parsing it."""
    length = request.headers.get("content-length")
    limit = int(os.environ.get("HWGP_MAX_REQUEST_BYTES", "2000000"))
    if length is not None and length.isdigit() and int(length) > limit:
        return JSONResponse(
            {"detail": [{"loc": ["body"], "msg": f"request body is {length} bytes; the limit is {limit}"}]},
            status_code=413,
        )
    return await call_next(request)


def _validation_422(error: ValidationError) -> HTTPException:
    detail = [
        {"loc": ["body", "params", *(str(p) for p in e["loc"])], "msg": e["msg"]} for e in error.errors()
    ]
    return HTTPException(422, detail=detail)


def _cause(error: BaseException) -> str:
    """The message of what really failed inside a Ray task, without Ray's traceback wrapper."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}" if not isinstance(cause, ValueError) else str(cause)


def _http_error(status: int, field: str, message: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": ["body", *field.split(".")], "msg": message}])


@serve.deployment(max_ongoing_requests=200)
@serve.ingress(app)
class Ingress:
    def __init__(
        self, config: dict[str, Any], default_models: dict[str, str], handles: dict[str, DeploymentHandle]
    ):
        self.config = AppConfig.model_validate(config)
        self.settings = self.config.ingress
        os.environ["HWGP_MAX_REQUEST_BYTES"] = str(self.settings.max_request_bytes)
        self.default_models = default_models
        self.handles = handles
        # What the loop claims: task types and how many may run at once, per route.
        self.routes: dict[str, tuple[tuple[str, ...], int]] = {
            name: (DEPLOYMENT_TASK_TYPES[name], self.config.families[name].capacity) for name in handles
        }
        if "VACE" in handles:
            self.routes[ORCHESTRATION] = (
                ORCHESTRATION_TASK_TYPES,
                self.config.ingress.orchestration_capacity,
            )
        self.routes[UTILITY] = (UTILITY_TASK_TYPES, self.config.ingress.utility_capacity)
        self.capacity = {name: capacity for name, (_, capacity) in self.routes.items()}
        self.catalog = Catalog.load(self.config.models_dir)
        self.store: TaskStore = open_store(os.environ.get("HWGP_DB") or self.config.db)
        self.storage = (
            OutputStorage.from_dict(self.config.storage) if self.config.storage else OutputStorage()
        )
        self.fetcher = InputFetcher(self.config.input_dirs, outputs=self.storage)
        # Stable across restarts (one per app per host) plus an incarnation: a restart takes back at once
        # the tasks a killed predecessor held (deployments/recovery.py).
        self.worker_id = new_worker_id(stable_identity(serve.get_replica_context().app_name))
        requeue_predecessors(self.store, self.worker_id, silent_for_s=3 * self.settings.heartbeat_interval_s)
        self.served_task_types = {t for types, _ in self.routes.values() for t in types}
        self.in_flight: dict[str, InFlight] = {}
        self.stopping = False
        self.loop_error: str | None = None
        self._wake = asyncio.Event()
        self._metrics()
        loop = asyncio.get_running_loop()
        self._sync_task = loop.create_task(self._sync_loop())
        self._heartbeat_task = loop.create_task(self._heartbeat_loop())
        logger.info("ingress %s serving %s over %s", self.worker_id, sorted(handles), self.store.url)

    def _metrics(self) -> None:
        self.m_claimed = Counter("hwgp_tasks_claimed", description="Tasks claimed.", tag_keys=("task_type",))
        self.m_completed = Counter(
            "hwgp_tasks_completed", description="Tasks completed.", tag_keys=("task_type",)
        )
        self.m_failed = Counter("hwgp_tasks_failed", description="Tasks failed.", tag_keys=("task_type",))
        self.m_generation = Histogram(
            "hwgp_generation_seconds",
            description="Claim to stored output, per model.",
            boundaries=[1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600],
            tag_keys=("model",),
        )
        self.m_queue = Gauge("hwgp_queue_depth", description="Queued tasks this ingress serves.")
        self.m_in_flight = Gauge("hwgp_in_flight", description="Tasks running from this ingress.")

    # ---------------------------------------------------------------------------------------------
    # HTTP API
    # ---------------------------------------------------------------------------------------------

    @app.post("/tasks", status_code=201, response_model=Task)
    async def create_task(self, body: CreateTaskRequest) -> Task:
        """Queue a task. 422 names the field that is wrong; nothing is written then."""
        try:
            new = new_task(
                task_type=body.task_type,
                params=body.params,
                dependant_on=body.dependant_on,
                project_id=body.project_id,
                priority=body.priority,
                id=body.task_id,
            )
        except InvalidTask as error:
            raise _http_error(422, error.field, error.problem) from None
        await asyncio.to_thread(self._validate_params, new.task_type, new.params)
        try:
            task = await asyncio.to_thread(self.store.create, new)
        except InvalidTask as error:
            raise _http_error(422, error.field, error.problem) from None
        self._wake.set()
        return task

    @app.get("/tasks/{task_id}", response_model=Task)
    async def get_task(self, task_id: str) -> Task:
        try:
            return await asyncio.to_thread(self.store.get, task_id)
        except TaskNotFound as error:
            raise HTTPException(404, detail=str(error)) from None

    @app.get("/tasks", response_model=list[Task])
    async def list_tasks(
        self,
        status: str | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> list[Task]:
        try:
            parsed = TaskStatus.parse(status) if status else None
        except ValueError as error:
            raise HTTPException(422, detail=[{"loc": ["query", "status"], "msg": str(error)}]) from None
        return await asyncio.to_thread(
            self.store.list,
            status=parsed,
            task_type=task_type,
            project_id=project_id,
            limit=limit,
            offset=offset,
        )

    @app.post("/tasks/{task_id}/cancel", response_model=Task)
    async def cancel_task(self, task_id: str) -> Task:
        """Cancel a queued or running task; a running one stops at its next denoising step."""
        try:
            task = await asyncio.to_thread(self.store.cancel, task_id)
        except TaskNotFound as error:
            raise HTTPException(404, detail=str(error)) from None
        except TaskConflict as error:
            raise HTTPException(409, detail=str(error)) from None
        entry = self.in_flight.get(task_id)
        if entry is not None:
            self._stop(entry)
        return task

    @app.get("/tasks/{task_id}/output")
    async def get_output(self, task_id: str):
        """The stored output: the file itself when it is on this node, else a redirect to its URL."""
        task = await self.get_task(task_id)
        if task.status != TaskStatus.COMPLETE or not task.output_location:
            raise HTTPException(409, detail=f"task {task_id} is {task.status.value}; it has no output")
        local = self.storage.resolve_local(task.output_location)
        if local is not None and local.is_file():
            return FileResponse(local, filename=local.name)
        if task.output_location.startswith(("http://", "https://")):
            return RedirectResponse(task.output_location, status_code=307)
        raise HTTPException(404, detail=f"output {task.output_location} is not stored on this node")

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while the sync loop runs and the database answers; 503 otherwise."""
        problems = []
        if self._sync_task.done():
            problems.append(f"sync loop stopped: {self.loop_error or 'finished'}")
        try:
            counts = await asyncio.to_thread(self.store.count_by_status)
        except Exception as error:  # the database is what we report on, whatever broke
            counts = {}
            problems.append(f"database: {type(error).__name__}: {error}")
        body = {
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "worker_id": self.worker_id,
            "database": self.store.url.split("@")[-1],
            "in_flight": {name: self._in_flight_on(name) for name in self.routes},
            "capacity": self.capacity,
            "tasks": {status.value: n for status, n in counts.items()},
        }
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/replicas")
    async def replicas(self) -> dict[str, Any]:
        """Each family deployment's counters (loads, resident model) as one of its replicas reports them."""
        results = await asyncio.gather(
            *(h.stats.remote() for h in self.handles.values()), return_exceptions=True
        )
        return {
            name: (r if not isinstance(r, BaseException) else {"error": str(r)})
            for name, r in zip(self.handles, results, strict=True)
        }

    # ---------------------------------------------------------------------------------------------
    # Validation shared by the API (at the boundary) and the loop (for rows written directly)
    # ---------------------------------------------------------------------------------------------

    def _validate_params(self, task_type: str, params: dict[str, Any]) -> str:
        """Check what can be checked without running the task; returns the deployment. Raises 422."""
        if task_type in ORCHESTRATION_TASK_TYPES and task_type in self.served_task_types:
            return self._validate_orchestration(task_type, params)
        if task_type in UTILITY_TASK_TYPES:
            try:
                validate_utility(task_type, params)
            except ValidationError as error:
                raise _validation_422(error) from None
            except ValueError as error:
                raise _http_error(422, "params", str(error)) from None
            for name in UTILITY_INPUT_FIELDS:
                self._check_local_input(name, params.get(name))
            return UTILITY
        if task_type not in self.served_task_types:
            raise _http_error(
                422,
                "task_type",
                f"{task_type!r} is not served here; served: {', '.join(sorted(self.served_task_types))}",
            )
        try:
            deployment, _ = self._route(task_type, params)
        except ValidationError as error:
            raise HTTPException(
                422,
                detail=[
                    {"loc": ["body", "params", *(str(p) for p in e["loc"])], "msg": e["msg"]}
                    for e in error.errors()
                ],
            ) from None
        except (EngineError, ValueError) as error:
            raise _http_error(422, "params.model", str(error)) from None
        for name in INPUT_FIELDS:
            self._check_local_input(name, params.get(name))
        return deployment

    def _validate_orchestration(self, task_type: str, params: dict[str, Any]) -> str:
        try:
            refs = ORCHESTRATIONS[task_type].validate(params)
        except ValidationError as error:
            raise _validation_422(error) from None
        except ValueError as error:
            raise _http_error(422, "params", str(error)) from None
        for name, value in refs:
            self._check_local_input(name, value)
        return ORCHESTRATION

    def _check_local_input(self, name: str, value: Any) -> None:
        refs = value if isinstance(value, list) else [value]
        for i, ref in enumerate(refs):
            # Local paths and output locations only: URLs are fetched once, when the task runs.
            if isinstance(ref, str) and "://" not in ref:
                label = f"{name}[{i}]" if isinstance(value, list) else name
                try:
                    self.fetcher.fetch(ref, field=label)
                except InputError as error:
                    raise _http_error(422, f"params.{label}", str(error)) from None

    def _route(self, task_type: str, params: dict[str, Any]) -> tuple[str, ModelDefinition]:
        """The family deployment and model a generation task runs on (validates its params)."""
        definition = self._model(task_type, params)
        deployment = FAMILY_DEPLOYMENT[definition.family]
        if deployment not in self.handles:
            raise ValueError(
                f"model {definition.id!r} is a {definition.family} model, which this app does not serve"
            )
        return deployment, definition

    def _model(self, task_type: str, params: dict[str, Any]) -> ModelDefinition:
        parsed = parse_params(task_type, _without_inputs(params))
        return resolve_model(self.catalog, self.default_models, task_type, parsed)

    def _fetch_inputs(self, params: dict[str, Any], fields: tuple[str, ...] = INPUT_FIELDS) -> dict[str, Any]:
        """The params with each input reference replaced by the file's bytes."""
        resolved = dict(params)
        for name in fields:
            value = params.get(name)
            if isinstance(value, str):
                resolved[name] = self.fetcher.fetch(value, field=name).read_bytes()
            elif isinstance(value, list):
                resolved[name] = [p.read_bytes() for p in self.fetcher.fetch_many(value, field=name)]
        return resolved

    # ---------------------------------------------------------------------------------------------
    # The sync loop
    # ---------------------------------------------------------------------------------------------

    def _in_flight_on(self, deployment: str) -> int:
        return sum(1 for e in self.in_flight.values() if e.deployment == deployment)

    async def _sync_loop(self) -> None:
        maintenance_every = max(1.0, min(10.0, self.settings.stale_after_s / 4))
        last_maintenance = 0.0
        while not self.stopping:
            try:
                if time.monotonic() - last_maintenance > maintenance_every:
                    await self._maintenance()
                    last_maintenance = time.monotonic()
                claimed = await self._claim()
                self.loop_error = None
                if not claimed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_interval_s)
                    self._wake.clear()
            except Exception as error:  # keep the loop alive through a database hiccup
                self.loop_error = f"{type(error).__name__}: {error}"
                logger.exception("sync loop iteration failed")
                await asyncio.sleep(self.settings.poll_interval_s)

    async def _maintenance(self) -> None:
        changed = await asyncio.to_thread(
            self.store.requeue_stale, self.settings.stale_after_s, self.settings.max_attempts
        )
        for task in changed:
            logger.warning(
                "task %s -> %s (%s)", task.id, task.status.value, task.error_message or task.progress_message
            )
        if self.settings.fail_unknown_task_types:
            queued = await asyncio.to_thread(self.store.list, status=TaskStatus.QUEUED, limit=1000)
            for task in queued:
                if task.task_type not in self.served_task_types and task.task_type not in MANAGED_TASK_TYPES:
                    message = (
                        f"task_type {task.task_type!r} is not served by this application; "
                        f"served: {', '.join(sorted(self.served_task_types))}"
                    )
                    await asyncio.to_thread(self.store.fail, task.id, message)
                    self.m_failed.inc(tags={"task_type": task.task_type})
        counts = await asyncio.to_thread(self.store.count_by_status, sorted(self.served_task_types))
        self.m_queue.set(counts[TaskStatus.QUEUED])

    async def _claim(self) -> int:
        claimed = 0
        for route, (task_types, capacity) in self.routes.items():
            free = capacity - self._in_flight_on(route)
            if free <= 0 or self.stopping:
                continue
            tasks = await asyncio.to_thread(self.store.claim_next, self.worker_id, task_types, free)
            for task in tasks:
                self.m_claimed.inc(tags={"task_type": task.task_type})
                entry = InFlight(task=task, deployment=route)
                self.in_flight[task.id] = entry
                asyncio.get_running_loop().create_task(self._run(entry))
            claimed += len(tasks)
        self.m_in_flight.set(len(self.in_flight))
        return claimed

    async def _run(self, entry: InFlight) -> None:
        """Produce the task's artifact on its route, store it, complete the row; or fail / requeue it."""
        task = entry.task
        try:
            if entry.deployment == ORCHESTRATION:
                artifact, model_id, finish = await self._orchestrate(entry)
            elif entry.deployment == UTILITY:
                artifact, model_id, finish = await self._utility(entry), task.task_type, None
            else:
                artifact, model_id, finish = await self._generate(entry), entry.model_id, None
            if entry.cancelled or artifact is None:
                raise asyncio.CancelledError
            try:
                saved = await asyncio.to_thread(self.storage.save, task.id, artifact)
            except StorageError as error:
                raise TaskFailure(f"storing the output failed: {error}", retryable=error.retryable) from None
            if finish is not None:
                await asyncio.to_thread(finish, saved.output_location)
            await asyncio.to_thread(self.store.complete, task.id, saved.output_location, self.worker_id)
            self.m_completed.inc(tags={"task_type": task.task_type})
            self.m_generation.observe(time.monotonic() - entry.started, tags={"model": model_id})
        except TaskFailure as failure:
            await self._fail(entry, str(failure), retryable=failure.retryable)
        except (asyncio.CancelledError, TaskConflict, TaskCancelledError):
            if not entry.cancelled:  # we are shutting down: give the task back
                await asyncio.to_thread(
                    self.store.release, task.id, self.worker_id, f"requeued: {self.worker_id} shut down"
                )
        except Exception as error:  # the replica died or Ray lost it: the task may run again
            logger.warning("task %s: %s: %s", task.id, type(error).__name__, error)
            await self._fail(entry, f"replica error: {type(error).__name__}: {error}", retryable=True)
        finally:
            self.in_flight.pop(task.id, None)
            self.m_in_flight.set(len(self.in_flight))
            self._wake.set()

    async def _generate(self, entry: InFlight) -> Artifact | None:
        """One generation on the family deployment its model belongs to, streamed."""
        task = entry.task
        try:
            entry.deployment, definition = self._route(task.task_type, task.params)
            entry.model_id = definition.id
            params = await asyncio.to_thread(self._fetch_inputs, task.params)
        except ValidationError as error:
            raise TaskFailure(describe_validation_error(error)) from None
        except (EngineError, InputError, ValueError) as error:
            raise TaskFailure(str(error)) from None
        handle = self.handles[entry.deployment].options(stream=True, multiplexed_model_id=entry.model_id)
        stream = handle.generate.remote(task.task_type, params, task.id)
        entry.on_cancel = stream.cancel
        artifact = None
        async for event in stream:
            kind = event["event"]
            if kind == "progress":
                await self._progress(entry, event["step"], event["total"])
            elif kind == "done":
                artifact = event["artifact"]
            elif kind == "error":
                if event["kind"] == "cancelled":
                    raise asyncio.CancelledError
                raise TaskFailure(event["message"])
        return artifact

    async def _orchestrate(self, entry: InFlight) -> tuple[Artifact, str, Callable[[str], None]]:
        """A multi-step task: plan it, mirror its steps as rows, run its Ray DAG."""
        task = entry.task
        orchestration = ORCHESTRATIONS[task.task_type]
        try:
            run = await asyncio.to_thread(orchestration.prepare, self, task)
        except ValidationError as error:
            raise TaskFailure(describe_validation_error(error)) from None
        except (InputError, ValueError) as error:
            raise TaskFailure(str(error)) from None
        entry.on_cancel = run.cancel
        entry.child_rows = run.row_ids  # heartbeated with the orchestrator, so they never look stale
        try:
            artifact = await orchestration.execute(self, run)
        except BaseException as error:
            cancelled = entry.cancelled or isinstance(error, asyncio.CancelledError | TaskCancelledError)
            message = f"orchestrator {task.id} was cancelled" if cancelled else _cause(error)
            if cancelled and not entry.cancelled:  # shutting down: leave the rows for the resumed run
                raise
            await asyncio.to_thread(orchestration.abort, self, run, message, cancelled)
            if cancelled:
                raise
            failed_in_code = isinstance(error, RayTaskError) and isinstance(
                error.cause, StepFailed | ValueError
            )
            raise TaskFailure(message, retryable=not failed_in_code) from None
        model = artifact.metadata.get("model", task.task_type)
        return artifact, model, lambda location: orchestration.finish(self, run, location)

    async def _utility(self, entry: InFlight) -> Artifact:
        """A CPU utility task, run as a Ray task (never on a GPU replica's time)."""
        task = entry.task
        params = dict(task.params)
        source_id = params.get("input_video_task_id")
        if source_id and params.get("input_video_path") is None:
            try:
                source = await asyncio.to_thread(self.store.get, source_id)
            except TaskNotFound:
                raise TaskFailure(f"input_video_task_id: no task with id {source_id!r}") from None
            if source.status != TaskStatus.COMPLETE:
                raise TaskFailure(
                    f"input_video_task_id: task {source_id} is {source.status.value}; it has no output"
                )
            params["input_video_path"] = source.output_location
        try:
            params = await asyncio.to_thread(self._fetch_inputs, params, UTILITY_INPUT_FIELDS)
            ref = utility_node.remote(task.task_type, params, task.id)
            entry.on_cancel = lambda: ray.cancel(ref)
            return await ref
        except ValidationError as error:
            raise TaskFailure(describe_validation_error(error)) from None
        except (InputError, ValueError) as error:
            raise TaskFailure(str(error)) from None
        except RayTaskError as error:
            if isinstance(error.cause, ValueError | InputError | ValidationError):
                raise TaskFailure(_cause(error)) from None
            raise

    def model_id(self, task_type: str, params: dict[str, Any]) -> str:
        """The model a task would run on (used by orchestrations to route their steps)."""
        return self._model(task_type, params).id

    async def _fail(self, entry: InFlight, message: str, retryable: bool) -> None:
        try:
            task = await asyncio.to_thread(
                self.store.fail,
                entry.task.id,
                message,
                worker_id=self.worker_id,
                retryable=retryable,
                max_attempts=self.settings.max_attempts,
            )
        except TaskConflict:
            return  # cancelled or requeued meanwhile: nothing of ours to record
        if task.status == TaskStatus.FAILED:
            self.m_failed.inc(tags={"task_type": entry.task.task_type})

    async def _progress(self, entry: InFlight, step: int, total: int) -> None:
        now = time.monotonic()
        if now - entry.last_progress_write < self.settings.progress_interval_s and step < total:
            return
        entry.last_progress_write = now
        elapsed = now - entry.started
        eta = elapsed / max(step, 1) * (total - step)
        # Denoising is most of the work; decoding and saving come after the last step.
        fraction = min(0.99, step / max(total, 1))
        still_ours = await asyncio.to_thread(
            self.store.set_progress,
            entry.task.id,
            self.worker_id,
            fraction,
            f"step {step}/{total}, ETA {eta:.0f} s",
        )
        if not still_ours:
            self._stop(entry)

    def _stop(self, entry: InFlight) -> None:
        entry.cancelled = True
        if entry.on_cancel is not None:
            entry.on_cancel()

    async def _heartbeat_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            for entry in list(self.in_flight.values()):
                try:
                    alive = await asyncio.to_thread(self.store.heartbeat, entry.task.id, self.worker_id)
                except Exception:
                    logger.exception("heartbeat for %s failed", entry.task.id)
                    continue
                if not alive:  # cancelled (or requeued by another ingress): stop the generation
                    self._stop(entry)
                for row_id in entry.child_rows:  # only rows In Progress for us are touched
                    await asyncio.to_thread(self.store.heartbeat, row_id, self.worker_id)

    async def __del__(self) -> None:
        """Graceful shutdown: stop claiming, let in-flight work finish, give the rest back."""
        self.stopping = True
        self._wake.set()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for entry in list(self.in_flight.values()):
            if entry.on_cancel is not None:
                entry.on_cancel()
            await asyncio.to_thread(
                self.store.release, entry.task.id, self.worker_id, f"requeued: {self.worker_id} shut down"
            )
        self._heartbeat_task.cancel()
        self.store.close()
