"""`different_perspective_orchestrator`'s params and target pose, Ray-free (the API validates with them).

The DAG that runs it is `dag.perspective`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dag.pose import detect_pose, mirror_pose, rotate_pose, yaw_pose
from Wan2GP.params import parse_resolution, quantize_frames


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
    # The original's guide for the new view: "pose" (OpenPose there, our weight-free estimator here) or
    # "depth" (a depth model, not installed here: refused).
    perspective_type: Literal["pose", "depth"] = "pose"

    # Unknown keys from existing clients are kept and reported in the result as ignored
    # (`ignored_params`); original and short names both accepted.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @field_validator("perspective_type")
    @classmethod
    def _pose_only(cls, value: str) -> str:
        if value == "depth":
            raise ValueError(
                "'depth' needs a depth model to build the guide, which is not installed here; use 'pose'"
            )
        return value

    def ignored_params(self) -> dict[str, str]:
        """Keys this orchestration does not read, as the task's result reports them."""
        return {key: "not used by different_perspective_orchestrator" for key in self.model_extra or {}}

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


def validate(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check a payload at the API (pydantic.ValidationError names the field); returns its input references."""
    parsed = PerspectiveParams.model_validate(params)
    refs: list[tuple[str, Any]] = [("input_image_path", parsed.input_image_path)]
    if parsed.target_image_path:
        refs.append(("target_image_path", parsed.target_image_path))
    return refs
