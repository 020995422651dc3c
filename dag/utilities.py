"""Plain functions behind the utility task types: frame extraction, clip joining, pose and interpolation.

Each returns frames or bytes and raises ValueError naming the parameter on bad input; the deployments
that run them on CPU save the result and record the task.

    generate_openpose        -> dag.pose.generate_openpose (frames, metadata naming the pose_estimator)
    rife_interpolate_images  -> dag.interpolate.rife_interpolate_images (frames, metadata naming the interpolator)
    extract_frame            -> PNG bytes
    join_clips               -> frames
    different perspective    -> dag.pose.detect_pose / mirror_pose / rotate_pose / yaw_pose / pose_guide_video
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dag.interpolate import rife_interpolate_images
from dag.pose import (
    detect_pose,
    detect_poses,
    generate_openpose,
    mirror_pose,
    pose_estimator,
    pose_guide_video,
    rotate_pose,
    silhouette_pose,
    yaw_pose,
)
from Wan2GP.params import parse_resolution
from Wan2GP.video import decode_video, encode_png, fit_resolution, probe_video, stitch, to_uint8_frames
from Wan2GP.video import extract_frame as _extract_frame

__all__ = [
    "UTILITY_INPUT_FIELDS",
    "ExtractFrameParams",
    "InterpolateParams",
    "JoinClipsParams",
    "OpenposeParams",
    "detect_pose",
    "detect_poses",
    "extract_frame",
    "extract_frame_array",
    "generate_openpose",
    "join_clips",
    "mirror_pose",
    "pose_estimator",
    "pose_guide_video",
    "rife_interpolate_images",
    "rotate_pose",
    "silhouette_pose",
    "yaw_pose",
]


def _video(source: Any, name: str) -> np.ndarray | bytes | str:
    if source is None or (isinstance(source, str | bytes) and len(source) == 0):
        raise ValueError(f"{name} is required (a video path, bytes or (T, H, W, 3) frames)")
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(f"{name} must be (T, H, W, 3) frames, got shape {source.shape}")
        return to_uint8_frames(source)
    return source


def extract_frame_array(video: Any, frame_index: int) -> np.ndarray:
    """Frame ``frame_index`` (negative = from the end) of a video as uint8 (H, W, 3) RGB."""
    source = _video(video, "video")
    if isinstance(frame_index, bool) or not isinstance(frame_index, int | np.integer):
        raise ValueError(f"frame_index must be an integer, got {frame_index!r}")
    try:
        return _extract_frame(source, int(frame_index))
    except IndexError:
        count = len(source) if isinstance(source, np.ndarray) else probe_video(source)["frames"]
        raise ValueError(
            f"frame_index {frame_index} is out of range: the video has {count} frames "
            f"(valid: 0 to {count - 1}, or -1 to -{count} from the end)"
        ) from None
    except FileNotFoundError as error:
        raise ValueError(f"video: {error}") from None
    except ValueError as error:
        raise ValueError(f"video: {error}") from None


def extract_frame(video: Any, frame_index: int) -> bytes:
    """Frame ``frame_index`` of a video (path, bytes or frames) as PNG bytes."""
    return encode_png(extract_frame_array(video, frame_index))


def join_clips(
    clips: Sequence[Any],
    overlaps: int | Sequence[int] = 0,
    sharpness: float = 0.0,
    resolution: tuple[int, int] | None = None,
) -> np.ndarray:
    """Cross-fade clips in order: ``overlaps[i]`` frames join clip i and i+1 (one value = every boundary).

    Clips are videos (paths, bytes or (T, H, W, 3) frames); they are resized to ``resolution`` (width,
    height) or to the first clip's size with a centre crop. The result has Σ len(clip) − Σ overlaps frames.
    """
    if isinstance(clips, str | bytes) or not isinstance(clips, Sequence) or len(clips) < 2:
        raise ValueError("clips must be a list of at least 2 videos")
    frames = []
    for i, clip in enumerate(clips):
        source = _video(clip, f"clips[{i}]")
        if isinstance(source, np.ndarray):
            frames.append(source)
            continue
        try:
            frames.append(decode_video(source)[0])
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"clips[{i}]: {error}") from None
    if resolution is None:
        width, height = frames[0].shape[2], frames[0].shape[1]
    elif isinstance(resolution, list | tuple) and len(resolution) == 2:
        width, height = resolution
    else:
        raise ValueError(f"resolution must be (width, height), got {resolution!r}")
    frames = [
        clip if clip.shape[1:3] == (height, width) else fit_resolution(clip, width, height, "crop")
        for clip in frames
    ]
    if isinstance(overlaps, int) and not isinstance(overlaps, bool):
        overlaps = [overlaps] * (len(frames) - 1)
    if not isinstance(overlaps, Sequence) or len(overlaps) != len(frames) - 1:
        raise ValueError(f"overlaps must be one integer or {len(frames) - 1} integers, got {overlaps!r}")
    return stitch(frames, list(overlaps), sharpness=sharpness)


# --- params models of the utility task types (Ray-free: the API and routing validate with them) ---

# Params holding input references, fetched by the dispatcher before the task runs.
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
