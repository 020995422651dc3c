"""The VACE control keys of a `vace` generation (`video_prompt_type` letters, `mask_expand`,
`video_guide_outpainting`), prepared one level above the engine (`Wan2GP/control.py` does the work).

Wan2GP prepares the control video from these keys before its VACE pipeline call; here a CPU Ray task does
it between fetching the task's inputs and streaming it to the VACE deployment (`deployments/runners.py`
`GenerationRunner`), so the replica receives a finished guide and mask and never spends GPU time on Canny
or optical flow. Ray-free. `check_vace_control` runs
at POST: a letter that cannot be honoured here (scribble S/W, depth D/Y without a depth model) is a 422
naming `video_prompt_type`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ValidationError

from dag.pose import PoseEstimator, pose_estimator, render_people
from Wan2GP.control import VaceControlParams, prepare_vace_control, read_letters
from Wan2GP.field_errors import field_error
from Wan2GP.params import parse_params
from Wan2GP.structure import depth_model_dir, load_depth_estimator
from Wan2GP.video import mask_to_video

CONTROL_KEYS = ("video_prompt_type", "mask_expand", "video_guide_outpainting")
# Letters that only say which inputs the pipeline uses (V guide, A mask, I references): the engine
# reads the guide, mask and references when they are given, so these alone need no preparation.
_INPUT_FLAGS = set("VAI")


def without_control(params: dict[str, Any]) -> dict[str, Any]:
    """The params the engine sees once the control step has consumed the control keys (or, at POST,
    what the engine's own VACE params validate: the letters are this step's to check)."""
    return {k: v for k, v in params.items() if k not in CONTROL_KEYS} if control_requested(params) else params


def control_requested(params: dict[str, Any]) -> bool:
    """Whether the task asks for control preparation beyond "use the guide / mask / references as given"."""
    letters = params.get("video_prompt_type") or ""
    if isinstance(letters, str) and set(letters) - _INPUT_FLAGS:
        return True
    return bool(params.get("mask_expand")) or params.get("video_guide_outpainting") not in (None, "")


def check_vace_control(params: dict[str, Any]) -> VaceControlParams:
    """Validate the control keys at POST (pydantic.ValidationError naming the key)."""
    control = VaceControlParams.model_validate({k: params[k] for k in CONTROL_KEYS if k in params})
    letters = read_letters(control.video_prompt_type)
    processes = {letters.process, letters.outside}
    if "scribble" in processes:
        raise field_error(
            ("video_prompt_type",), "scribble (S / W) needs the scribble model, which is not installed here"
        )
    if "depth" in processes and depth_model_dir() is None:
        raise field_error(
            ("video_prompt_type",),
            "depth (D / Y) needs a depth model; none is installed (WAN2GP_DEPTH_MODEL_DIR)",
        )
    guide = params.get("video_guide")
    if (letters.process != "raw" or letters.outside) and (
        guide is None or isinstance(guide, str) and not guide
    ):
        raise field_error(("video_guide",), f"is required by video_prompt_type {control.video_prompt_type!r}")
    return control


def render_poses(frames: np.ndarray, estimator: PoseEstimator | None = None) -> np.ndarray:
    """Pose drawings of frames (`dag/pose.py`: OpenPose when installed, else the weight-free estimator;
    black where no-one is found)."""
    estimator = estimator or pose_estimator()
    height, width = frames.shape[1:3]
    return np.stack([render_people(estimator.detect(frame), width, height) for frame in frames])


def prepare_vace_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's params with `video_guide` / `video_mask` replaced by the prepared control video and mask
    and the control keys consumed, and what the result should report (letters ignored, notes)."""
    control = check_vace_control(params)
    parsed = parse_params("vace", without_control(params))
    guide = parsed.video_guide
    height, width = guide.shape[1:3]
    if parsed.resolution is not None:
        width, height = parsed.resolution
    estimator = pose_estimator() if "pose" in _processes(control) else None
    prepared = prepare_vace_control(
        guide,
        parsed.video_mask,
        width,
        height,
        control,
        depth_estimator=load_depth_estimator() if "depth" in _processes(control) else None,
        pose_renderer=lambda frames: render_poses(frames, estimator),
    )
    ready = {k: v for k, v in params.items() if k not in CONTROL_KEYS}
    ready["video_guide"] = prepared.guide
    ready["video_mask"] = None if prepared.mask is None else mask_to_video(prepared.mask)
    report = {
        "control_process": prepared.process,
        "ignored_letters": prepared.ignored,
        "notes": prepared.notes,
    }
    if estimator is not None:
        report["pose_estimator"] = estimator.name
    return ready, report


def _processes(control: VaceControlParams) -> set[str | None]:
    letters = read_letters(control.video_prompt_type)
    return {letters.process, letters.outside}


class ControlFailed(ValueError):
    """The control preparation refused the task's inputs (the message names the key)."""


def run_vace_control(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`prepare_vace_params` for a Ray task: a refusal comes back as a plain ValueError naming the key
    (pydantic's ValidationError does not cross Ray)."""
    try:
        return prepare_vace_params(params)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "params"
        raise ControlFailed(f"{field}: {first['msg']}") from None
