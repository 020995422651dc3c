"""`different_perspective_orchestrator` as a Ray DAG: pose guide → VACE generation → final frame.

    image ─> pose guide (input pose → target pose) ─> VACE (guide + the image as reference) ─> last frame

The target pose is the input pose mirrored, rotated or turned (`target_pose`: "mirror", "rotate:30",
"yaw:60"), or the pose found in `target_image_path`. The last step is mirrored by a `dp_final_gen` row,
as in the original, and the orchestrator completes with that frame as a PNG.

What differs from the original: it drew its guide with an OpenPose model and a depth model. Poses come
from `dag.pose`: OpenPose when `body_pose_model.pth` is installed (`$HWGP_ANNOTATORS_DIR`), else a
weight-free silhouette estimator that needs one full-body figure on a plain background; the final
frame's metadata names it (`pose_estimator`). There is no depth guide.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import ray

from dag.orchestrations import RunContext, StepTarget
from dag.perspective_plan import PerspectiveParams, target_pose, validate
from dag.pose import detect_pose, pose_estimator_name, pose_guide_video
from dag.steps import StepFailed, generate_step
from db.models import NewTask, Task
from db.store import TaskNotFound
from deployments.task_types import PERSPECTIVE_FINAL
from deployments.thumbnail_step import save_row_thumbnail
from Wan2GP.artifact import Artifact
from Wan2GP.video import decode_video, encode_mp4, encode_png, fit_resolution, load_image

__all__ = ["abort", "execute", "finish", "prepare", "validate"]  # the Orchestration protocol


# --- DAG nodes ------------------------------------------------------------------------------------


@ray.remote(num_cpus=0.05, max_retries=0)
def pose_guide_node(params: PerspectiveParams, images: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
    image, target_image = images
    width, height = params.resolution
    fitted = fit_resolution(image, width, height, "crop")
    source = detect_pose(fitted)
    if source is None:
        raise ValueError("input_image_path: no person found in the input image")
    target = target_pose(
        params, source, None if target_image is None else fit_resolution(target_image, width, height, "crop")
    )
    return pose_guide_video(source, target, params.frames, width, height)


@ray.remote(num_cpus=0.05, max_retries=0)
def generate_node(
    params: PerspectiveParams, guide: np.ndarray, images: tuple, step: StepTarget, task_id: str
) -> Artifact:
    width, height = params.resolution
    target = step
    request = {
        "prompt": params.prompt,
        "resolution": f"{width}x{height}",
        "video_length": params.frames,
        "video_guide": guide,
        "image_refs": [images[0]],  # the input image keeps the subject's look
        "seed": params.seed,
    }
    if params.negative_prompt is not None:
        request["negative_prompt"] = params.negative_prompt
    if params.num_inference_steps is not None:
        request["num_inference_steps"] = params.num_inference_steps
    try:
        return generate_step(
            target.handle, target.model_id, target.task_type, request, task_id, target.lora_files
        )
    except StepFailed as error:
        raise StepFailed(f"perspective video: {error}") from None


@ray.remote(num_cpus=0.05, max_retries=0)
def final_frame_node(params: PerspectiveParams, clip: Artifact, run_id: str) -> Artifact:
    frames, _ = decode_video(clip.data)
    return Artifact(
        data=encode_png(frames[-1]),
        filename=f"{run_id}_final.png",
        media_type="image/png",
        metadata={
            "frames_generated": len(frames),
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
            "model": clip.metadata.get("model"),
            "seed": clip.metadata.get("seed"),
            "perspective_type": params.perspective_type,
            "pose_estimator": pose_estimator_name(),  # the guide node's: same configuration
            "ignored_params": params.ignored_params(),
        },  # fmt: skip
    )


# --- orchestration (runs in the dispatcher) -----------------------------------------------------------


@dataclass
class PerspectiveRun:
    task: Task
    params: PerspectiveParams
    run_id: str
    final_id: str
    refs: list[ray.ObjectRef] | None = None
    output: Artifact | None = None  # the final frame, for the final row's thumbnail in `finish`

    def cancel(self) -> None:
        for ref in self.refs or []:
            ray.cancel(ref, recursive=True)

    @property
    def row_ids(self) -> list[str]:
        return [self.final_id]


def prepare(ctx: RunContext, task: Task) -> PerspectiveRun:
    params = PerspectiveParams.model_validate(task.params)
    run_id = params.run_id or task.id
    final_id = str(uuid.uuid5(uuid.UUID(task.id), PERSPECTIVE_FINAL))
    try:
        ctx.store.get(final_id)
    except TaskNotFound:
        row = {"orchestrator_task_id": task.id, "run_id": run_id}
        ctx.store.create(
            NewTask(id=final_id, task_type=PERSPECTIVE_FINAL, params=row, project_id=task.project_id)
        )
    return PerspectiveRun(task=task, params=params, run_id=run_id, final_id=final_id)


async def execute(ctx: RunContext, run: PerspectiveRun) -> Artifact:
    params = run.params

    def load() -> tuple[np.ndarray, np.ndarray | None]:
        image = load_image(ctx.fetcher.fetch(params.input_image_path, field="input_image_path"))
        target = None
        if params.target_image_path:
            target = load_image(ctx.fetcher.fetch(params.target_image_path, field="target_image_path"))
        return image, target

    images = await ctx.blocking(load)
    model = {"model": params.model} if params.model else {}
    step = ctx.step({"video_guide": "guide", **model})
    images_ref = await ctx.blocking(ray.put, images)
    guide_ref = pose_guide_node.remote(params, images_ref)
    run.refs = [guide_ref]
    await guide_ref  # the generation's slot is asked for when its guide is ready
    async with ctx.place(step, run.task.id, model) as placed:
        clip_ref = generate_node.remote(params, guide_ref, images_ref, placed, run.task.id)
        run.refs.append(clip_ref)
        clip_artifact: Artifact = await clip_ref
    final_ref = final_frame_node.remote(params, clip_ref, run.run_id)
    run.refs.append(final_ref)
    await ctx.blocking(ctx.store.start, run.final_id, ctx.worker_id)
    if params.debug_mode_enabled:  # keep the intermediate guide and video next to the final frame
        guide_frames = await guide_ref
        guide_video = await ctx.blocking(encode_mp4, guide_frames, fps=16)
        await ctx.blocking(
            ctx.storage.save_bytes, run.final_id, guide_video, f"{run.run_id}_guide.mp4", "video/mp4"
        )
        await ctx.blocking(
            ctx.storage.save_bytes, run.final_id, clip_artifact.data, f"{run.run_id}_video.mp4", "video/mp4"
        )
    run.output = await final_ref
    if placed.scheduling is not None:  # the run's result says which pool generated its video
        run.output.metadata["scheduling"] = placed.scheduling
    return run.output


def finish(ctx: RunContext, run: PerspectiveRun, output_location: str) -> None:
    """The final row completes with the run's output and a thumbnail of its own (an image's: a third of
    its size, as the original's complete-task makes for image outputs)."""
    thumbnail_url = save_row_thumbnail(ctx.storage, run.final_id, run.output)
    ctx.store.complete_idempotent(
        run.final_id, output_location, worker_id=ctx.worker_id, thumbnail_url=thumbnail_url
    )


def abort(ctx: RunContext, run: PerspectiveRun, message: str, cancelled: bool) -> None:
    row = ctx.store.get(run.final_id)
    if row.status.is_final:
        return
    if cancelled:
        ctx.store.cancel(run.final_id)
    else:
        ctx.store.fail(run.final_id, message)
