"""Joining clips with generated VACE bridges: `join_clips_segment` and `join_clips_orchestrator`.

The plans live in `dag/join_plan.py` (Ray-free); this module runs them. One join is a Ray task (CPU:
decode, guide, splice) whose bridge is generated on the VACE deployment (`dag.steps.generate_step`):

    join_clips_segment        start ─┐
                              end ───┴─> join_node ─> {task_id}_joined.mp4

    join_clips_orchestrator   clip0 ─> join0 ─> join1 ─> join2 ─> the joined video
                              clip1 ───┘        │        │        (the last join's file)
                              clip2 ────────────┘        │
                              clip3 ─────────────────────┘

The orchestrator mirrors each join as a `join_clips_segment` row (deterministic ids; row 0 depends on
the orchestrator, row i on row i-1, and each row is started before its predecessor completes, so the
dispatcher does not claim them while their orchestrator drives them; a row that was claimed on its own
anyway, e.g. requeued after a crash, does the same join, and its output continues the chain).
`dag/edit.py` runs `edit_video_orchestrator` through the same chain.

The cross-fade `join_clips` utility (`dag/utilities.py`) is a different, older task type of this
service and keeps its own meaning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from pydantic import ValidationError

from dag.join_plan import (
    Generate,
    JoinResult,
    JoinRunPlan,
    JoinSettings,
    ignored_keys,
    join_child_payloads,
    joined_filename,
    parse_join_orchestrator,
    parse_join_segment,
    run_join,
    validate_join_orchestrator,
    validate_join_segment,
)
from dag.orchestrations import RunContext, StepTarget
from dag.steps import StepFailed, generate_step
from dag.travel import _ensure_row, mirror_id
from db.models import Task, TaskStatus
from db.store import TaskConflict, TaskNotFound
from deployments.errors import describe_validation_error
from deployments.task_types import JOIN_CLIPS_SEGMENT
from deployments.thumbnail_step import save_row_thumbnail, save_thumbnail
from Wan2GP.artifact import Artifact
from Wan2GP.video import decode_video, encode_mp4

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_WAIT_S = 1800.0  # a join's deadline when the task gives no max_wait_time

# A clip handed to a join node: encoded video bytes, or the decoded output of the previous join.
Clip = bytes | dict


# --- what the single-generation task types share (also used by dag.edit, dag.individual_segment) ----


def step_frames(step: StepTarget, task_id: str) -> Generate:
    """`generate(task_type, params) -> frames` on the step deployment, for the Ray-free plans."""

    def generate(task_type: str, params: dict[str, Any]) -> np.ndarray:
        return decode_video(generate_step(step.handle, step.model_id, task_type, params, task_id).data)[0]

    return generate


def video_artifact(result: JoinResult, filename: str, **metadata: Any) -> Artifact:
    """The encoded output of a join or an inpaint, with its frame arithmetic for the task's result."""
    spec = result.spec
    return Artifact(
        data=encode_mp4(result.frames, fps=round(result.fps)),
        filename=filename,
        media_type="video/mp4",
        metadata={
            "frames": int(result.frames.shape[0]),
            "fps": result.fps,
            "width": int(result.frames.shape[2]),
            "height": int(result.frames.shape[1]),
            "bridge_frames": spec.total,
            "context_frames": [spec.context_before, spec.context_after],
            "gap_frames": spec.gap,
            "quantization_shift": spec.quantization_shift,
            **metadata,
        },
    )


async def await_with_deadline(ref: ray.ObjectRef, deadline_s: float, what: str) -> Any:
    """The result of a Ray task, or TimeoutError (and the task cancelled) after `deadline_s`."""

    async def result() -> Any:
        return await ref

    try:
        return await asyncio.wait_for(result(), deadline_s)
    except TimeoutError:
        ray.cancel(ref, recursive=True)
        raise TimeoutError(f"{what} did not finish within {deadline_s:g} s (max_wait_time)") from None


def _decoded(clip: Clip) -> tuple[np.ndarray, float]:
    return (clip["frames"], clip["fps"]) if isinstance(clip, dict) else decode_video(clip)


@ray.remote(num_cpus=0.05, max_retries=0)
def join_node(
    start: Clip,
    end: Clip,
    settings: JoinSettings,
    generation: dict[str, Any],
    step: StepTarget,
    task_id: str,
    filename: str,
    label: str,
) -> dict[str, Any]:
    """Join two clips: plan and generate the bridge (VACE), splice; returns the frames and the artifact."""
    clip_a, fps_a = _decoded(start)
    clip_b, fps_b = _decoded(end)
    try:
        result = run_join(clip_a, fps_a, clip_b, fps_b, settings, generation, step_frames(step, task_id))
    except ValidationError as error:  # a plan that does not fit the clips' real lengths
        raise StepFailed(f"{label}: {describe_validation_error(error)}") from None
    except StepFailed as error:
        raise StepFailed(f"{label}: {error}") from None
    return {"frames": result.frames, "fps": result.fps, "artifact": video_artifact(result, filename)}


# --- join_clips_segment -----------------------------------------------------------------------------


def vace_step(ctx: RunContext, model: str | None) -> StepTarget:
    """The VACE step target for a model (None: the default); resolved in `prepare`, so a model that
    cannot run here fails the task there, named, instead of being retried."""
    return ctx.step({"video_guide": "guide", **({"model": model} if model else {})})


@dataclass
class SingleRun:
    """A task of one Ray node (no mirror rows)."""

    task: Task
    parsed: Any
    step: StepTarget
    refs: list[ray.ObjectRef] = dataclasses.field(default_factory=list)

    @property
    def row_ids(self) -> list[str]:
        return []

    def cancel(self) -> None:
        for ref in self.refs:
            ray.cancel(ref, recursive=True)


def predecessor_output(ctx: RunContext, task: Task, field: str) -> str:
    """The output location of the task this one depends on (a chained step's input)."""
    if not task.dependant_on:
        raise ValueError(f"{field}: is required (the task has no dependant_on predecessor to take it from)")
    try:
        source = ctx.store.get(task.dependant_on)
    except TaskNotFound:
        raise ValueError(f"{field}: predecessor task {task.dependant_on} does not exist") from None
    if source.status != TaskStatus.COMPLETE or not source.output_location:
        raise ValueError(f"{field}: predecessor task {source.id} is {source.status.value}; it has no output")
    return source.output_location


class JoinSegment:
    """`join_clips_segment`: join `starting_video_path` (or the predecessor's output) and `ending_video_path`."""

    validate = staticmethod(validate_join_segment)

    def prepare(self, ctx: RunContext, task: Task) -> SingleRun:
        segment, generation = parse_join_segment(task.params)
        return SingleRun(task, (segment, generation), vace_step(ctx, segment.model))

    async def execute(self, ctx: RunContext, run: SingleRun) -> Artifact:
        segment, generation = run.parsed
        task = run.task

        def load() -> tuple[bytes, bytes]:
            start = segment.starting_video_path or predecessor_output(ctx, task, "starting_video_path")
            start_bytes = ctx.fetcher.fetch(start, field="starting_video_path").read_bytes()
            end_bytes = ctx.fetcher.fetch(segment.ending_video_path, field="ending_video_path").read_bytes()
            return start_bytes, end_bytes

        start, end = await ctx.blocking(load)
        ref = join_node.remote(
            start,
            end,
            segment,
            generation,
            run.step,
            task.id,
            joined_filename(task.id),
            f"join {segment.join_index}",
        )
        run.refs.append(ref)
        result = await await_with_deadline(ref, segment.max_wait_time or DEFAULT_MAX_WAIT_S, "the join")
        artifact: Artifact = result["artifact"]
        artifact.metadata["ignored"] = ignored_keys(task.params)
        return artifact

    def finish(self, ctx: RunContext, run: SingleRun, output_location: str) -> None:
        """Nothing else to store."""

    def abort(self, ctx: RunContext, run: SingleRun, message: str, cancelled: bool) -> None:
        """No rows of its own."""


# --- join_clips_orchestrator (and edit_video_orchestrator's chain) ----------------------------------


@dataclass
class JoinChainRun:
    """A chain of joins mirrored by `join_clips_segment` rows: clips[i + 1] joins the result so far."""

    task: Task
    plan: JoinRunPlan
    row_ids: list[str]
    steps: list[StepTarget]  # steps[i]: where join i's bridge is generated
    # Clips already decoded by `prepare` (an edit's keepers, a reversed first clip), by index.
    decoded: dict[int, dict] = dataclasses.field(default_factory=dict)
    refs: list[ray.ObjectRef] = dataclasses.field(default_factory=list)
    output: Artifact | None = None  # the last join's video, for the last row's thumbnail in `finish_chain`

    def cancel(self) -> None:
        for ref in self.refs:
            ray.cancel(ref, recursive=True)


def make_chain(ctx: RunContext, task: Task, plan: JoinRunPlan, payloads: list[dict]) -> JoinChainRun:
    """The mirror rows of a chain (made once: a re-claimed orchestrator finds them again)."""
    row_ids = [mirror_id(task.id, f"{JOIN_CLIPS_SEGMENT}:{i}") for i in range(len(payloads))]
    for i, (row_id, payload) in enumerate(zip(row_ids, payloads, strict=True)):
        depends = row_ids[i - 1] if i > 0 else task.id  # never claimable while the orchestrator drives it
        _ensure_row(ctx.store, row_id, JOIN_CLIPS_SEGMENT, payload, depends, task.project_id)
    steps = [vace_step(ctx, settings.model) for settings in plan.joins]
    return JoinChainRun(task=task, plan=plan, row_ids=row_ids, steps=steps)


async def execute_chain(ctx: RunContext, run: JoinChainRun) -> Artifact:
    """Run the joins in order, completing each row as its join finishes; returns the last join's video.

    Rows are claimable task types, so a row whose predecessor is Complete could be claimed on its own (a
    requeued row of a resumed run): the next row is started before the current one completes, and a row
    found Complete when taken over (someone ran it standalone) is used as it is.
    """
    plan = run.plan

    def load() -> tuple[dict[int, Clip], dict[int, dict]]:
        clips: dict[int, Clip] = dict(run.decoded)
        fetched: dict[str, bytes] = {}
        for i, clip in enumerate(plan.clips):
            if i not in clips:
                if clip.url not in fetched:
                    fetched[clip.url] = ctx.fetcher.fetch(clip.url, field=f"clip_list[{i}]").read_bytes()
                clips[i] = fetched[clip.url]
        reused = {}
        for i, row_id in enumerate(run.row_ids[:-1]):  # the last row's output is the orchestrator's
            stored = _stored_clip(ctx, ctx.store.get(row_id))
            if stored is None:
                break
            reused[i] = stored
        return clips, reused

    clips, reused = await ctx.blocking(load)
    if reused:
        logger.info("join run %s: reusing stored joins %s", plan.run_id, sorted(reused))
    pending = [i for i in range(len(run.row_ids)) if i not in reused]
    previous: dict = reused[max(reused)] if reused else {}
    done_elsewhere = await ctx.blocking(_take_over, ctx, run.row_ids[pending[0]])
    for n, i in enumerate(pending):
        if done_elsewhere is None:
            model = {"model": plan.joins[i].model} if plan.joins[i].model else {}
            async with ctx.place(run.steps[i], run.row_ids[i], {**plan.generation, **model}) as step:
                ref = join_node.remote(
                    previous or clips[0], clips[i + 1], plan.joins[i], plan.generation, step,
                    run.row_ids[i], joined_filename(run.row_ids[i]), f"join {i}",
                )  # fmt: skip
                run.refs = [ref]
                result = await await_with_deadline(
                    ref, plan.joins[i].max_wait_time or DEFAULT_MAX_WAIT_S, f"join {i}"
                )
            if step.scheduling is not None:  # the join row's result says which pool ran it
                result["artifact"].metadata["scheduling"] = step.scheduling
        else:
            result = done_elsewhere
        # take the next row before this one completes, so it is never claimable in between
        following = pending[n + 1] if n + 1 < len(pending) else None
        done_elsewhere = (
            None if following is None else await ctx.blocking(_take_over, ctx, run.row_ids[following])
        )
        if i < len(run.row_ids) - 1 and not result.get("elsewhere"):  # the last row: finish_chain
            await ctx.blocking(_record_join, ctx, run.row_ids[i], result["artifact"])
        previous = result
    artifact: Artifact = previous["artifact"]
    artifact.metadata.update(joins=len(run.row_ids), run_id=plan.run_id, ignored=list(plan.ignored))
    run.output = artifact
    return artifact


def _stored_clip(ctx: RunContext, row: Task) -> dict | None:
    """A Complete row's stored output as a join result (frames, fps, artifact), or None."""
    if row.status != TaskStatus.COMPLETE or not row.output_location:
        return None
    local = ctx.storage.resolve_local(row.output_location)
    if local is None:
        return None
    data = local.read_bytes()
    frames, fps = decode_video(data)
    artifact = Artifact(data, local.name, "video/mp4", {"frames": len(frames), "fps": fps, "reused": True})
    return {"frames": frames, "fps": fps, "artifact": artifact, "elsewhere": True}


def _take_over(ctx: RunContext, row_id: str) -> dict | None:
    """Start a row for this run; None, or its stored result when it was already completed standalone."""
    try:
        ctx.store.start(row_id, ctx.worker_id)
        return None
    except TaskConflict:
        stored = _stored_clip(ctx, ctx.store.get(row_id))
        if stored is None:
            raise
        logger.info("join row %s was completed on its own: its output continues the chain", row_id)
        return stored


def _record_join(ctx: RunContext, row_id: str, artifact: Artifact) -> None:
    if ctx.store.get(row_id).status == TaskStatus.COMPLETE:  # completed on its own meanwhile
        return
    saved = ctx.storage.save(row_id, artifact)
    thumbnail_url = save_thumbnail(ctx.storage, row_id, artifact)  # the join's first frame, as the original
    ctx.store.complete(row_id, saved.output_location, worker_id=ctx.worker_id, thumbnail_url=thumbnail_url)


def finish_chain(ctx: RunContext, run: JoinChainRun, output_location: str) -> None:
    """The last join's row completes with the orchestrator's output (one file, not two) and a thumbnail
    of its own."""
    last = run.row_ids[-1]
    if ctx.store.get(last).status != TaskStatus.COMPLETE:
        thumbnail_url = save_row_thumbnail(ctx.storage, last, run.output)
        ctx.store.complete(last, output_location, worker_id=ctx.worker_id, thumbnail_url=thumbnail_url)


def abort_chain(ctx: RunContext, run: JoinChainRun, message: str, cancelled: bool) -> None:
    """A failed or cancelled run: its unfinished rows say so (last first: a cancelled or failed row fails
    its queued dependants with a message naming it, and each row should carry the run's own reason)."""
    for row_id in reversed(run.row_ids):
        if ctx.store.get(row_id).status.is_final:
            continue
        if cancelled:
            ctx.store.cancel(row_id)
        else:
            ctx.store.fail(row_id, message)


class JoinOrchestrator:
    """`join_clips_orchestrator`: join `clip_list` in order, one VACE bridge per pair of clips."""

    validate = staticmethod(validate_join_orchestrator)

    def prepare(self, ctx: RunContext, task: Task) -> JoinChainRun:
        plan = parse_join_orchestrator(task.params, default_run_id=task.id)
        decoded: dict[int, dict] = {}
        if plan.loop_first_clip:  # clip 1 is clip 0 played backwards, stored so its row can name it
            first = plan.clips[0]
            frames, fps = decode_video(ctx.fetcher.fetch(first.url, field="clip_list[0]"))
            reversed_frames = frames[::-1]
            saved = ctx.storage.save_bytes(
                task.id, encode_mp4(reversed_frames, fps=round(fps)), f"{plan.clips[1].name}.mp4", "video/mp4"
            )
            clips = (first, dataclasses.replace(plan.clips[1], url=saved.output_location), *plan.clips[2:])
            plan = dataclasses.replace(plan, clips=clips)
            decoded[1] = {"frames": np.ascontiguousarray(reversed_frames), "fps": fps}
        run = make_chain(ctx, task, plan, join_child_payloads(plan, task.id, task.project_id))
        run.decoded = decoded
        return run

    async def execute(self, ctx: RunContext, run: JoinChainRun) -> Artifact:
        return await execute_chain(ctx, run)

    finish = staticmethod(finish_chain)
    abort = staticmethod(abort_chain)


join_clips_segment = JoinSegment()
join_clips_orchestrator = JoinOrchestrator()
