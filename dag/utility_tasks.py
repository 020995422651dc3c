"""Utility task types, run as Ray tasks on CPU (never on a GPU replica's time).

    generate_openpose        pose skeleton video (or PNG) of `input_video_path` / `input_image_path`
    rife_interpolate_images  `frames` frames from `input_image_path1` to `input_image_path2` (DIS optical flow;
                             RIFE weights are not bundled, the output metadata says which method ran)
    extract_frame            frame `frame_index` of `input_video_path`, or of `input_video_task_id`'s output, as PNG
    join_clips               `clips` cross-faded in order over `overlap` frames each

The ingress fetches every input (path, URL, output location) and passes bytes here.
"""

from __future__ import annotations

from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dag.interpolate import rife_interpolate_images
from dag.pose import generate_openpose
from dag.utilities import extract_frame, join_clips
from Wan2GP.artifact import Artifact
from Wan2GP.params import parse_resolution
from Wan2GP.video import encode_mp4, encode_png, load_image

# Params holding input references, fetched by the ingress before the task runs.
UTILITY_INPUT_FIELDS = (
    "input_image_path",
    "input_video_path",
    "input_image_path1",
    "input_image_path2",
    "clips",
)


class _Params(BaseModel):
    model_config = ConfigDict(extra="allow")  # keep unknown keys from existing clients

    fps: int = Field(default=16, ge=1, le=120)


class OpenposeParams(_Params):
    input_image_path: Any = None
    input_video_path: Any = None

    @model_validator(mode="after")
    def _one_source(self) -> OpenposeParams:
        if (self.input_image_path is None) == (self.input_video_path is None):
            raise ValueError("input_image_path / input_video_path: give exactly one")
        return self


class InterpolateParams(_Params):
    input_image_path1: Any
    input_image_path2: Any
    frames: int = Field(default=16, ge=2, le=1000, description="frames in the output, both images included")
    resolution: tuple[int, int] | None = None

    _resolution = field_validator("resolution", mode="before")(lambda value: parse_resolution(value))


class ExtractFrameParams(_Params):
    frame_index: int
    input_video_path: Any = None
    input_video_task_id: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ExtractFrameParams:
        if self.input_video_path is None and self.input_video_task_id is None:
            raise ValueError("input_video_path / input_video_task_id: give one")
        return self


class JoinClipsParams(_Params):
    clips: list[Any] = Field(min_length=2)
    overlap: int | list[int] = 0
    crossfade_sharpness: float = Field(default=0.0, ge=0.0, le=10.0)
    resolution: tuple[int, int] | None = None

    _resolution = field_validator("resolution", mode="before")(lambda value: parse_resolution(value))


PARAMS: dict[str, type[_Params]] = {
    "generate_openpose": OpenposeParams,
    "rife_interpolate_images": InterpolateParams,
    "extract_frame": ExtractFrameParams,
    "join_clips": JoinClipsParams,
}


def validate_utility(task_type: str, params: dict[str, Any]) -> _Params:
    """The params model for `task_type` (pydantic.ValidationError names the field)."""
    return PARAMS[task_type].model_validate(params)


def _video_artifact(frames, fps: int, filename: str, metadata: dict[str, Any]) -> Artifact:
    if len(frames) == 1:
        return Artifact(encode_png(frames[0]), f"{filename}.png", "image/png", metadata)
    return Artifact(encode_mp4(frames, fps=fps), f"{filename}.mp4", "video/mp4", metadata)


def run_utility(task_type: str, params: dict[str, Any], task_id: str) -> Artifact:
    """Run one utility task on already fetched inputs (bytes)."""
    parsed = validate_utility(task_type, params)
    size = getattr(parsed, "resolution", None)
    if isinstance(parsed, OpenposeParams):
        source = (
            parsed.input_video_path
            if parsed.input_video_path is not None
            else load_image(parsed.input_image_path)
        )
        frames, metadata = generate_openpose(source, fps=parsed.fps)
        return _video_artifact(frames, parsed.fps, f"{task_id}_openpose", metadata)
    if isinstance(parsed, InterpolateParams):
        frames, metadata = rife_interpolate_images(
            parsed.input_image_path1, parsed.input_image_path2, parsed.frames, resolution=size
        )
        return _video_artifact(frames, parsed.fps, f"{task_id}_interpolated", {**metadata, "fps": parsed.fps})
    if isinstance(parsed, ExtractFrameParams):
        data = extract_frame(parsed.input_video_path, parsed.frame_index)
        return Artifact(
            data, f"{task_id}_frame{parsed.frame_index}.png", "image/png", {"frame_index": parsed.frame_index}
        )
    frames = join_clips(parsed.clips, parsed.overlap, parsed.crossfade_sharpness, resolution=size)
    return _video_artifact(
        frames, parsed.fps, f"{task_id}_joined", {"frames": len(frames), "clips": len(parsed.clips)}
    )


utility_node = ray.remote(num_cpus=0.1, max_retries=0)(run_utility)
