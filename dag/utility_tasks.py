"""Utility task types, run as Ray tasks on CPU (never on a GPU replica's time).

    generate_openpose        pose skeleton video (or PNG) of `input_video_path` / `input_image_path` (OpenPose
                             when installed, else a silhouette heuristic; metadata `pose_estimator` says which)
    rife_interpolate_images  `frames` frames from `input_image_path1` to `input_image_path2` (RIFE when
                             installed, else DIS optical flow; metadata `interpolator` says which)
    extract_frame            frame `frame_index` of `input_video_path`, or of `input_video_task_id`'s output, as PNG
    join_clips               `clips` cross-faded in order over `overlap` frames each

The dispatcher fetches every input (path, URL, output location) and passes bytes here; the params
models live Ray-free in `dag.utilities`.
"""

from __future__ import annotations

from typing import Any

import ray

from dag.interpolate import rife_interpolate_images
from dag.pose import generate_openpose
from dag.utilities import (
    ExtractFrameParams,
    InterpolateParams,
    OpenposeParams,
    extract_frame,
    join_clips,
)
from deployments.task_types import parse_task_params
from Wan2GP.artifact import Artifact
from Wan2GP.video import encode_mp4, encode_png, load_image


def _video_artifact(frames, fps: int, filename: str, metadata: dict[str, Any]) -> Artifact:
    if len(frames) == 1:
        return Artifact(encode_png(frames[0]), f"{filename}.png", "image/png", metadata)
    return Artifact(encode_mp4(frames, fps=fps), f"{filename}.mp4", "video/mp4", metadata)


def run_utility(task_type: str, params: dict[str, Any], task_id: str) -> Artifact:
    """Run one utility task on already fetched inputs (bytes)."""
    parsed = parse_task_params(task_type, params)
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
