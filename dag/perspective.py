"""`different_perspective_orchestrator` as a Ray DAG: pose guide → VACE generation → final frame.

    image ─> pose guide (input pose → target pose) ─> VACE (guide + the image as reference) ─> last frame

The target pose is the input pose mirrored, rotated or turned (`target_pose`: "mirror", "rotate:30",
"yaw:60"), or the pose found in `target_image_path`. The last step is mirrored by a `dp_final_gen` row,
as in the original, and the orchestrator completes with that frame as a PNG.

What differs from the original: it drew its guide with an OpenPose model and a depth model; we have
no weights for those, so poses come from `dag.pose` (a weight-free silhouette estimator that needs one
full-body figure on a plain background) and there is no depth guide.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.dag import InputNode, MultiOutputNode

from dag.pose import detect_pose, mirror_pose, pose_guide_video, rotate_pose, yaw_pose
from dag.steps import StepFailed, generate_step
from db.models import NewTask, Task
from db.store import TaskNotFound
from Wan2GP.artifact import Artifact
from Wan2GP.params import parse_resolution, quantize_frames
from Wan2GP.video import decode_video, encode_mp4, encode_png, fit_resolution, load_image

FINAL_TYPE = "dp_final_gen"


class PerspectiveParams(BaseModel):
    input_image_path: str
    prompt: str = ""
    negative_prompt: str | None = None
    target_pose: str = "mirror"
    target_image_path: str | None = None
    resolution: tuple[int, int] = (832, 480)
    frames: int = Field(default=17, ge=5, le=257, alias="output_video_frames")
    model: str | None = Field(default=None, alias="model_name")
    seed: int = -1
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)
    run_id: str | None = None
    debug_mode_enabled: bool = False

    # Unknown keys from existing clients are kept; original and short names both accepted.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    _resolution = field_validator("resolution", mode="before")(
        lambda value: parse_resolution(value) or (832, 480)
    )

    @field_validator("frames")
    @classmethod
    def _quantized(cls, value: int) -> int:
        return quantize_frames(value)

    @field_validator("target_pose")
    @classmethod
    def _known_target(cls, value: str) -> str:
        kind, _, amount = value.partition(":")
        if kind == "mirror" and not amount:
            return value
        if kind in ("rotate", "yaw"):
            try:
                float(amount)
                return value
            except ValueError:
                pass
        raise ValueError(f"must be 'mirror', 'rotate:DEGREES' or 'yaw:DEGREES', got {value!r}")


def target_pose(params: PerspectiveParams, source: np.ndarray, target_image: np.ndarray | None) -> np.ndarray:
    if target_image is not None:
        found = detect_pose(target_image)
        if found is None:
            raise ValueError("target_image_path: no person found in the target image")
        return found
    kind, _, amount = params.target_pose.partition(":")
    if kind == "mirror":
        return mirror_pose(source)
    width, height = params.resolution
    return (
        rotate_pose(source, float(amount), aspect=width / height)
        if kind == "rotate"
        else yaw_pose(source, float(amount))
    )


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
    params: PerspectiveParams, guide: np.ndarray, images: tuple, vace: Any, model_id: str, task_id: str
) -> Artifact:
    width, height = params.resolution
    step = {
        "prompt": params.prompt,
        "resolution": f"{width}x{height}",
        "video_length": params.frames,
        "video_guide": guide,
        "image_refs": [images[0]],  # the input image keeps the subject's look
        "seed": params.seed,
    }
    if params.negative_prompt is not None:
        step["negative_prompt"] = params.negative_prompt
    if params.num_inference_steps is not None:
        step["num_inference_steps"] = params.num_inference_steps
    try:
        return generate_step(vace, model_id, "vace", step, task_id)
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
        },  # fmt: skip
    )


# --- orchestration (runs in the ingress) -----------------------------------------------------------


@dataclass
class PerspectiveRun:
    task: Task
    params: PerspectiveParams
    run_id: str
    final_id: str
    refs: list[ray.ObjectRef] | None = None

    def cancel(self) -> None:
        for ref in self.refs or []:
            ray.cancel(ref, recursive=True)

    @property
    def row_ids(self) -> list[str]:
        return [self.final_id]


def validate(params: dict[str, Any]) -> list[tuple[str, Any]]:
    parsed = PerspectiveParams.model_validate(params)
    refs: list[tuple[str, Any]] = [("input_image_path", parsed.input_image_path)]
    if parsed.target_image_path:
        refs.append(("target_image_path", parsed.target_image_path))
    return refs


def prepare(ctx: Any, task: Task) -> PerspectiveRun:
    params = PerspectiveParams.model_validate(task.params)
    run_id = params.run_id or task.id
    final_id = str(uuid.uuid5(uuid.UUID(task.id), FINAL_TYPE))
    try:
        ctx.store.get(final_id)
    except TaskNotFound:
        row = {"orchestrator_task_id": task.id, "run_id": run_id}
        ctx.store.create(NewTask(id=final_id, task_type=FINAL_TYPE, params=row, project_id=task.project_id))
    return PerspectiveRun(task=task, params=params, run_id=run_id, final_id=final_id)


async def execute(ctx: Any, run: PerspectiveRun) -> Artifact:
    params = run.params

    def load() -> tuple[np.ndarray, np.ndarray | None]:
        image = load_image(ctx.fetcher.fetch(params.input_image_path, field="input_image_path"))
        target = None
        if params.target_image_path:
            target = load_image(ctx.fetcher.fetch(params.target_image_path, field="target_image_path"))
        return image, target

    images = await asyncio.to_thread(load)
    model_params = {"video_guide": "guide", **({"model": params.model} if params.model else {})}
    model_id = ctx.model_id("vace", model_params)
    with InputNode() as images_input:
        guide = pose_guide_node.bind(params, images_input)
        clip = generate_node.bind(params, guide, images_input, ctx.handles["VACE"], model_id, run.task.id)
        final = final_frame_node.bind(params, clip, run.run_id)
        dag = MultiOutputNode([guide, clip, final])
    run.refs = dag.execute(images)
    guide_ref, clip_ref, final_ref = run.refs
    clip_artifact: Artifact = await clip_ref
    await asyncio.to_thread(ctx.store.start, run.final_id, ctx.worker_id)
    if params.debug_mode_enabled:  # keep the intermediate guide and video next to the final frame
        guide_frames = await guide_ref
        ctx.storage.save_bytes(
            run.final_id, encode_mp4(guide_frames, fps=16), f"{run.run_id}_guide.mp4", "video/mp4"
        )
        ctx.storage.save_bytes(run.final_id, clip_artifact.data, f"{run.run_id}_video.mp4", "video/mp4")
    return await final_ref


def finish(ctx: Any, run: PerspectiveRun, output_location: str) -> None:
    ctx.store.complete(run.final_id, output_location, worker_id=ctx.worker_id)


def abort(ctx: Any, run: PerspectiveRun, message: str, cancelled: bool) -> None:
    row = ctx.store.get(run.final_id)
    if row.status.is_final:
        return
    if cancelled:
        ctx.store.cancel(run.final_id)
    else:
        ctx.store.fail(run.final_id, message)
