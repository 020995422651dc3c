"""Video editing with VACE: `inpaint_frames` and `edit_video_orchestrator` (plans: `dag/edit_plan.py`).

inpaint_frames           video ─> inpaint_node (guide, VACE generation, splice) ─> {task_id}_inpainted.mp4
edit_video_orchestrator  source ─> keepers (the frames outside the portions, stored as keeper_{i}.mp4)
                         ─> the join chain of `dag/join.py`, one generated gap per portion
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
from pydantic import ValidationError

from dag.edit_plan import (
    EditRunPlan,
    InpaintParams,
    edit_join_payloads,
    inpaint_filename,
    keeper_clip_name,
    keeper_segments,
    parse_edit_video_orchestrator,
    parse_inpaint,
    run_inpaint,
    source_frame_count,
    validate_edit_video,
    validate_inpaint,
)
from dag.join import (
    DEFAULT_MAX_WAIT_S,
    JoinChainRun,
    SingleRun,
    abort_chain,
    await_with_deadline,
    execute_chain,
    finish_chain,
    make_chain,
    step_frames,
    vace_step,
    video_artifact,
)
from dag.join_plan import ClipRef, JoinRunPlan, resample_fps
from dag.orchestrations import RunContext, StepTarget
from dag.steps import StepFailed
from db.models import Task
from deployments.errors import describe_validation_error
from Wan2GP.artifact import Artifact
from Wan2GP.video import decode_video, encode_mp4


@ray.remote(num_cpus=0.05, max_retries=0)
def inpaint_node(
    video: bytes, params: InpaintParams, generation: dict[str, Any], step: StepTarget, task_id: str
) -> Artifact:
    """Regenerate the range of the video (VACE), splice it back; the whole video as the artifact."""
    frames, fps = decode_video(video)
    try:
        result = run_inpaint(frames, fps, params, generation, step_frames(step, task_id))
    except ValidationError as error:  # the range does not fit the video's real length
        raise StepFailed(describe_validation_error(error)) from None
    return video_artifact(
        result,
        inpaint_filename(task_id),
        inpainted_frames=[params.inpaint_start_frame, params.inpaint_end_frame],
    )


class InpaintFrames:
    """`inpaint_frames`: frames [inpaint_start_frame, inpaint_end_frame) of `video_path` regenerated."""

    validate = staticmethod(validate_inpaint)

    def prepare(self, ctx: RunContext, task: Task) -> SingleRun:
        params, generation = parse_inpaint(task.params)
        return SingleRun(task, (params, generation), vace_step(ctx, params.model))

    async def execute(self, ctx: RunContext, run: SingleRun) -> Artifact:
        params, generation = run.parsed
        video = await ctx.blocking(
            lambda: ctx.fetcher.fetch(params.video_path, field="video_path").read_bytes()
        )
        model = {"model": params.model} if params.model else {}
        async with ctx.place(run.step, run.task.id, {**generation, **model}) as step:
            ref = inpaint_node.remote(video, params, generation, step, run.task.id)
            run.refs.append(ref)
            artifact: Artifact = await await_with_deadline(ref, DEFAULT_MAX_WAIT_S, "the inpaint")
        if step.scheduling is not None:
            artifact.metadata["scheduling"] = step.scheduling
        return artifact

    def finish(self, ctx: RunContext, run: SingleRun, output_location: str) -> None:
        """Nothing else to store."""

    def abort(self, ctx: RunContext, run: SingleRun, message: str, cancelled: bool) -> None:
        """No rows of its own."""


class EditVideoOrchestrator:
    """`edit_video_orchestrator`: cut `portions_to_regenerate` out of the source and join the kept clips
    again, each join generating the portion's replacement."""

    validate = staticmethod(validate_edit_video)

    def prepare(self, ctx: RunContext, task: Task) -> JoinChainRun:
        plan: EditRunPlan = parse_edit_video_orchestrator(task.params, default_run_id=task.id)
        source = ctx.fetcher.fetch(plan.source_video_url, field="orchestrator_details.source_video_url")
        frames, fps = decode_video(source)
        frames = resample_fps(frames, fps, plan.source_fps)  # the portions count frames at source_video_fps
        keepers = keeper_segments(plan, source_frame_count(plan, len(frames)))
        decoded: dict[int, dict] = {}
        locations = []
        for i, (first, last) in enumerate(keepers):
            clip = np.ascontiguousarray(frames[first : last + 1])
            saved = ctx.storage.save_bytes(
                task.id, encode_mp4(clip, fps=round(plan.source_fps)), keeper_clip_name(i), "video/mp4"
            )
            locations.append(saved.output_location)
            decoded[i] = {"frames": clip, "fps": plan.source_fps}
        payloads = edit_join_payloads(plan, locations, task.id, task.project_id)
        join_plan = JoinRunPlan(
            run_id=plan.run_id,
            clips=tuple(ClipRef(url=url, name=f"keeper_{i}") for i, url in enumerate(locations)),
            joins=plan.joins,
            generation=plan.generation,
            loop_first_clip=False,
            ignored=plan.ignored,
        )
        run = make_chain(ctx, task, join_plan, payloads)
        run.decoded = decoded  # the keepers join from memory, not from their re-encoded files
        return run

    async def execute(self, ctx: RunContext, run: JoinChainRun) -> Artifact:
        artifact = await execute_chain(ctx, run)
        artifact.metadata["portions"] = len(run.row_ids)
        return artifact

    finish = staticmethod(finish_chain)
    abort = staticmethod(abort_chain)


inpaint_frames = InpaintFrames()
edit_video_orchestrator = EditVideoOrchestrator()
