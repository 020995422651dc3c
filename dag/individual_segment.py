"""`individual_travel_segment`: regenerate one segment of a travel run on its own (plan: `dag/segment_plan.py`).

One Ray task builds the segment's inputs (the start image on frame 0, the end image on the last frame;
with structure guidance the VACE control frames in the generated frames) and generates it on the step
deployment: VACE, or first/last-frame image-to-video (flf2v) for `model_type: i2v`. The raw generation
is the output, named like the run's segment: `{run_id}_seg{NN}_output.mp4`.
"""

from __future__ import annotations

from typing import Any

import ray
from pydantic import ValidationError

from dag.join import DEFAULT_MAX_WAIT_S, SingleRun, await_with_deadline
from dag.orchestrations import RunContext, StepTarget
from dag.segment_plan import (
    IndividualSegmentPlan,
    individual_segment_task,
    plan_individual_segment,
    validate_individual_segment,
)
from dag.steps import STAND_INS, StepFailed, generate_step
from dag.travel_plan import structure_references
from db.models import Task
from deployments.errors import describe_validation_error
from Wan2GP.artifact import Artifact
from Wan2GP.structure import apply_control, build_control_video
from Wan2GP.video import decode_video, extract_frame, load_image

__all__ = ["abort", "execute", "finish", "prepare", "validate"]  # the Orchestration protocol

validate = validate_individual_segment


@ray.remote(num_cpus=0.05, max_retries=0)
def segment_node(
    segment: IndividualSegmentPlan,
    start: bytes,
    start_is_video: bool,
    end: bytes | None,
    structure_videos: dict[str, bytes],
    step: StepTarget,
    task_id: str,
) -> Artifact:
    """Build the segment's generation inputs and generate it; the artifact is the segment's video."""
    start_image = extract_frame(start, -1) if start_is_video else load_image(start)
    end_image = load_image(end) if end is not None else None
    task_type, params = individual_segment_task(segment, start_image, end_image)
    notes: list[str] = []
    if segment.structure is not None:
        plan, spec = segment.plan, segment.spec
        try:
            control = build_control_video(
                segment.structure, max(plan.timeline_frames, spec.end), plan.width, plan.height, plan.fps,
                load_video=lambda path: decode_video(structure_videos[path]),
            )  # fmt: skip
        except ValidationError as error:
            raise StepFailed(describe_validation_error(error)) from None
        mask = params["video_mask"][..., 0]
        params["video_guide"] = apply_control(params["video_guide"], mask, control, offset=spec.start)
        notes = control.notes
    artifact = generate_step(step.handle, step.model_id, task_type, params, task_id)
    artifact.filename = segment.filename
    artifact.metadata.update(
        segment_index=segment.spec.index,
        run_id=segment.plan.run_id,
        mode=segment.mode,
        frames=segment.spec.frames,
        structure_type=segment.structure.structure_type if segment.structure else None,
        notes=notes,
    )
    return artifact


def prepare(ctx: RunContext, task: Task) -> SingleRun:
    segment = plan_individual_segment(task.params, default_run_id=task.id)
    # vace, or first/last-frame image-to-video for model_type i2v (on T2V); resolved here so a model of
    # the wrong family fails the task, named, instead of being retried
    task_type = "vace"
    if segment.mode == "i2v":
        task_type = "flf2v" if segment.end_image is not None else "i2v"  # no end image: plain i2v
    model: dict[str, Any] = {"model": segment.plan.model} if segment.plan.model else {}
    stand_in = STAND_INS[task_type]
    return SingleRun(task, segment, ctx.step({**stand_in, **model}, task_type=task_type))


async def execute(ctx: RunContext, run: SingleRun) -> Artifact:
    segment: IndividualSegmentPlan = run.parsed

    def load() -> tuple[bytes, bytes | None, dict[str, bytes]]:
        if segment.start_from_continued_video:
            start = ctx.fetcher.fetch(segment.plan.continue_from_video, field="continue_from_video")
        else:
            start = ctx.fetcher.fetch(segment.start_image, field="start_image")
        end = ctx.fetcher.fetch(segment.end_image, field="end_image") if segment.end_image else None
        videos = {
            ref: ctx.fetcher.fetch(ref, field=field).read_bytes()
            for field, ref in structure_references(segment.structure)
        }
        return start.read_bytes(), end.read_bytes() if end is not None else None, videos

    start, end, videos = await ctx.blocking(load)
    model = {"model": segment.plan.model} if segment.plan.model else {}
    async with ctx.place(run.step, run.task.id, {**segment.plan.segment_params_extra, **model}) as step:
        ref = segment_node.remote(
            segment, start, segment.start_from_continued_video, end, videos, step, run.task.id
        )
        run.refs.append(ref)
        artifact: Artifact = await await_with_deadline(ref, DEFAULT_MAX_WAIT_S, "the segment")
    if step.scheduling is not None:
        artifact.metadata["scheduling"] = step.scheduling
    return artifact


def finish(ctx: RunContext, run: SingleRun, output_location: str) -> None:
    """Nothing else to store."""


def abort(ctx: RunContext, run: SingleRun, message: str, cancelled: bool) -> None:
    """No rows of its own."""
