"""The Ray runners the dispatcher runs tasks through (see `deployments.dispatcher.Runner`).

    GenerationRunner    one generation streamed from a family deployment (progress, then the frames, encoded
                        in a CPU Ray task while the replica takes its next task)
    OrchestrationRunner a multi-step task: plan it, mirror its steps as rows, run its Ray DAG
    UtilityRunner       a CPU utility as a Ray task (never on a GPU replica's time)

They turn Ray's errors into the dispatcher's: `TaskFailure` (readable; retryable when the cluster,
not the input, failed) and `RunCancelled`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import replace
from functools import partial
from typing import Any

import ray
from pydantic import ValidationError
from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.handle import DeploymentHandle

from dag.orchestrations import RunContext, StepPlacement, StepTarget, Unplaced
from dag.steps import STAND_INS, StepFailed
from dag.utility_tasks import utility_node
from dag.vace_control import control_requested, run_vace_control
from db.models import Task, TaskStatus
from db.store import TaskStore
from deployments.dispatcher import Job, RunCancelled, RunResult, TaskFailure, failure_message
from deployments.errors import InvalidTask, TaskNotFound, describe_validation_error
from deployments.routing import Routing
from deployments.scheduling import StepTicket, task_uses_cfg
from deployments.task_types import orchestration, task_type
from storage import InputError, InputFetcher, OutputStorage
from Wan2GP.artifact import Artifact, Rendered, encode_rendered
from Wan2GP.params import postprocess_request
from Wan2GP.postprocess import PostProcess

logger = logging.getLogger("ray.serve")

_vace_control_node = ray.remote(num_cpus=0.05, max_retries=0)(run_vace_control)
# The MP4 / PNG encode of a replica's frames, on any node's CPU (ffmpeg runs in its own process), after the
# task's output post-processing (Wan2GP.postprocess). Idempotent, so a worker lost mid-encode is retried once.
encode_node = ray.remote(num_cpus=0.1, max_retries=1)(encode_rendered)


def user_message(error: BaseException, what: str) -> str:
    """What a task's owner is told of a failure inside a Ray task or DAG.

    Errors raised for the user (bad input: ValueError / InputError / pydantic's errors; a step's own
    message: StepFailed) keep their message, without Ray's wrapper. Anything else is a fault of the
    service: the owner gets a sentence and an incident id, and the log gets the details (Ray's
    traceback names files, the process id and the node's address).
    """
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, ValidationError):
        return describe_validation_error(cause)
    if isinstance(cause, ValueError | InputError | StepFailed):
        return str(cause)
    incident = uuid.uuid4().hex[:8]
    logger.error("%s failed unexpectedly (incident %s): %s", what, incident, error)
    return f"{what} failed unexpectedly ({type(cause).__name__}); incident {incident} in the service log"


async def _fetch_loras(job: Job, routing: Routing, params: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """The params with LoRA URLs replaced by content names, and content name -> object ref of the file:
    put into the object store once per task, so replicas (and each travel segment) pull it only when
    they lack it."""
    params, files = await job.blocking(routing.fetch_loras, params, _cancel_event(job))
    refs = {name: await job.blocking(ray.put, data) for name, data in files.items()}
    return params, refs


def _cancel_event(job: Job) -> threading.Event:
    """An event set when the job is cancelled: it aborts a download in progress."""
    event = threading.Event()
    job.on_cancel(event.set)
    return event


class GenerationRunner:
    def __init__(self, handles: dict[str, DeploymentHandle], routing: Routing):
        self.handles = handles
        self.routing = routing

    async def run(self, job: Job) -> RunResult:
        task, route = job.task, job.route
        assert route is not None and job.inputs is not None  # the dispatcher fetched them
        try:
            with job.timed("lora_fetch"):
                params, lora_files = await _fetch_loras(job, self.routing, job.inputs)
        except InputError as error:
            if job.cancelled:
                raise RunCancelled from None
            raise TaskFailure(str(error)) from None
        control_report: dict[str, Any] = {}
        if route.pool == "VACE" and control_requested(params):  # Wan2GP's control preparation, on CPU
            ref = _vace_control_node.remote(params)
            job.on_cancel(lambda: ray.cancel(ref))
            try:
                params, control_report = await ref
            except TaskCancelledError:
                raise RunCancelled from None
            except RayTaskError as error:
                if isinstance(error.cause, ValueError):
                    raise TaskFailure(user_message(error, "VACE control preparation")) from None
                raise
        # A family with a split pool: the deployment the dispatcher's scheduler chose (deployments/scheduling)
        deployment = job.decision.deployment if job.decision is not None else route.pool
        handle = self.handles[deployment].options(stream=True, multiplexed_model_id=route.model_id)
        stream = handle.generate.remote(task.task_type, params, task.id, lora_files)
        job.on_cancel(stream.cancel)
        output: Rendered | Artifact | None = None
        model_load: dict[str, Any] = {}
        try:
            async for event in stream:
                kind = event["event"]
                if kind == "loaded":  # the replica made the model resident (0 s when it already was)
                    job.timings["load"] = job.timings.get("load", 0.0) + event["seconds"]
                    model_load = {"model": event["model"], "reused": event.get("reused", False)}
                elif kind == "progress":
                    await job.progress(event["step"], event["total"])
                elif kind == "done":  # frames (a 1-GPU replica) or an encoded artifact (a multi-GPU one)
                    output = event.get("rendered") or event.get("artifact")
                elif kind == "error":
                    if event["kind"] == "cancelled":
                        raise RunCancelled
                    raise TaskFailure(event["message"])
        except TaskCancelledError:
            raise RunCancelled from None
        if output is None:
            raise RunCancelled
        job.gpu_done()  # the replica is free: its capacity goes to the next task while this one encodes
        try:
            post = postprocess_request(task.task_type, params)
        except ValueError as error:  # validated at POST; a row written straight into the table was not
            raise TaskFailure(str(error)) from None
        if isinstance(output, Rendered) or post is not None:
            artifact = await self._encode(job, output, post)
        else:
            artifact = output
        artifact.metadata.update(control_report)
        if model_load:  # the result's `model_load.reused`: resident before the task (e.g. prefetched)
            artifact.metadata["model_load"] = model_load
        return RunResult(artifact, route.model_id)

    async def prefetch(self, deployment: str, model_id: str) -> dict[str, Any]:
        """Have an idle replica of `deployment` load `model_id` ahead of its task (`deployments.prefetch`)."""
        handle = self.handles[deployment].options(multiplexed_model_id=model_id)
        return await handle.prefetch.remote(model_id)

    @staticmethod
    async def _encode(job: Job, rendered: Rendered | Artifact, post: PostProcess | None) -> Artifact:
        """The MP4 / PNG of `rendered`, post-processed (`post`) and encoded in a CPU Ray task (their times:
        the result's `postprocess` and `encode`)."""
        ref = encode_node.remote(rendered, post)
        job.on_cancel(lambda: ray.cancel(ref))
        try:
            return await ref
        except TaskCancelledError:
            raise RunCancelled from None
        except RayTaskError as error:
            if isinstance(error.cause, ValueError):  # frames that cannot be encoded: a fault of the output
                raise TaskFailure(user_message(error, "encoding the output")) from None
            raise  # ffmpeg or the node failed: the dispatcher retries the task


class OrchestrationRunner:
    def __init__(
        self,
        store: TaskStore,
        storage: OutputStorage,
        fetcher: InputFetcher,
        routing: Routing,
        handles: dict[str, DeploymentHandle],
        worker_id: str,
    ):
        self.store, self.storage, self.fetcher = store, storage, fetcher
        self.routing = routing
        self.handles = handles
        self.worker_id = worker_id

    def context(
        self, orchestrator_type: str, job: Job, lora_files: dict[str, bytes] | None = None
    ) -> RunContext:
        step_type = task_type(orchestrator_type).step_type  # type: ignore[union-attr]
        return RunContext(
            store=self.store,
            storage=self.storage,
            fetcher=self.fetcher,
            worker_id=self.worker_id,
            step=partial(self._step_target, step_type, lora_files or {}),
            blocking=job.blocking,
            place=partial(self._place, job),
        )

    def _place(
        self, job: Job, target: StepTarget, step_id: str, params: dict[str, Any] | None = None
    ) -> StepPlacement:
        """A step's placement (`RunContext.place`): scheduled with the family's tasks when it has a split
        pool, else its replicas as before."""
        if not job.schedules(target.family):
            return Unplaced(target)
        stand_in = {**STAND_INS.get(target.task_type, {}), **(params or {})}
        cfg = task_uses_cfg(self.routing, target.task_type, stand_in)
        return LeasedStep(job, target, job.step_ticket(target.family, step_id, cfg), self.handles)

    def _step_target(
        self,
        step_type: str,
        lora_files: dict[str, bytes],
        params: dict[str, Any],
        task_type: str | None = None,
    ) -> StepTarget:
        # `task_type`: a step of another generation type than the orchestration's (flf2v for i2v segments)
        step_type = task_type or step_type
        route = self.routing.route(step_type, params)
        return StepTarget(step_type, self.handles[route.pool], route.model_id or "", lora_files, route.pool)

    async def _with_fetched_loras(self, job: Job) -> tuple[Task, dict]:
        """The task with its LoRA URLs replaced by content names, and those files for its steps."""
        with job.timed("input_fetch"):
            params, lora_files = await _fetch_loras(job, self.routing, job.task.params)
        return job.task.model_copy(update={"params": params}), lora_files

    async def run(self, job: Job) -> RunResult:
        try:
            task, lora_files = await self._with_fetched_loras(job)
        except InputError as error:
            if job.cancelled:
                raise RunCancelled from None
            raise TaskFailure(str(error)) from None
        steps = orchestration(task.task_type)
        ctx = self.context(task.task_type, job, lora_files)
        try:
            run = await job.blocking(steps.prepare, ctx, task)
        except ValidationError as error:
            raise TaskFailure(describe_validation_error(error)) from None
        except InvalidTask as error:
            raise TaskFailure(failure_message(error)) from None
        except (InputError, ValueError) as error:
            raise TaskFailure(str(error)) from None
        job.on_cancel(run.cancel)
        job.watch_rows(run.row_ids)  # heartbeated with the orchestrator, so they never look stale
        try:
            artifact = await steps.execute(ctx, run)
        except BaseException as error:
            cancelled = job.cancelled or isinstance(
                error, asyncio.CancelledError | TaskCancelledError | RunCancelled
            )
            message = (
                f"orchestrator {task.id} was cancelled" if cancelled else user_message(error, task.task_type)
            )
            if cancelled and not job.cancelled:  # shutting down: leave the rows for the resumed run
                if isinstance(error, asyncio.CancelledError):
                    raise
                raise RunCancelled from None
            await job.blocking(steps.abort, ctx, run, message, cancelled)
            if cancelled:
                raise RunCancelled from None
            failed_in_code = isinstance(error, RayTaskError) and isinstance(
                error.cause, StepFailed | ValueError
            )
            raise TaskFailure(message, retryable=not failed_in_code) from None
        model = artifact.metadata.get("model", task.task_type)
        return RunResult(artifact, model, finish=partial(steps.finish, ctx, run))


class LeasedStep:
    """A step placed by its family's scheduler: entering waits for a slot (the dispatcher's
    `Job.lease_step`) and gives the target with the chosen pool's handle; leaving returns the slot."""

    def __init__(
        self, job: Job, target: StepTarget, ticket: StepTicket, handles: dict[str, DeploymentHandle]
    ):
        self.job, self.target, self.ticket, self.handles = job, target, ticket, handles

    async def __aenter__(self) -> StepTarget:
        decision = await self.job.lease_step(self.ticket)
        return replace(self.target, handle=self.handles[decision.deployment], scheduling=decision.placement())

    async def __aexit__(self, *exc: Any) -> None:
        self.ticket.release()

    def withdraw(self) -> None:
        self.ticket.release()


class UtilityRunner:
    def __init__(self, store: TaskStore, routing: Routing):
        self.store = store
        self.routing = routing

    async def run(self, job: Job) -> RunResult:
        task, route = job.task, job.route
        assert route is not None
        params = dict(task.params)
        source_id = params.get("input_video_task_id")
        if source_id and params.get("input_video_path") is None:
            try:
                source = await job.blocking(self.store.get, source_id)
            except TaskNotFound:
                raise TaskFailure(f"input_video_task_id: no task with id {source_id!r}") from None
            if source.status != TaskStatus.COMPLETE:
                raise TaskFailure(
                    f"input_video_task_id: task {source_id} is {source.status.value}; it has no output"
                )
            params["input_video_path"] = source.output_location
        cancel = threading.Event()
        job.on_cancel(cancel.set)
        try:
            params = await self.routing.fetch_inputs(params, route.task_type.input_fields, cancel=cancel)
            ref = utility_node.remote(task.task_type, params, task.id)
            job.on_cancel(lambda: ray.cancel(ref))
            return RunResult(await ref, task.task_type)
        except TaskCancelledError:
            raise RunCancelled from None
        except RayTaskError as error:  # before ValueError: Ray's error is also an instance of its cause
            if isinstance(error.cause, ValueError | InputError):
                raise TaskFailure(user_message(error, task.task_type)) from None
            raise  # the node or the code failed: the dispatcher retries it
        except ValidationError as error:
            raise TaskFailure(describe_validation_error(error)) from None
        except (InputError, ValueError) as error:
            if job.dropped:  # the download was aborted because the task was cancelled or handed back
                raise RunCancelled from None
            raise TaskFailure(str(error)) from None
