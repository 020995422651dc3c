"""Task params: one pydantic model per family, accepting the names existing clients send (FACTS.md).

Known keys are validated with messages that name the field; unknown keys are kept (``model_extra``) and
ignored, so payloads from newer or older clients still run. Image and video inputs are local paths, bytes
or arrays here: fetching URLs belongs to ``storage/``. They are decoded during validation, so a broken
input fails as a validation error of its field before any model is loaded.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from Wan2GP.catalog import TASK_FAMILIES
from Wan2GP.errors import UnsupportedTaskType

MAX_SIDE = 4096
MAX_FRAMES = 1025
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX*×]\s*(\d+)\s*$")


def quantize_frames(frames: int) -> int:
    """Wan needs 4·n+1 frames: ``(f // 4) * 4 + 1``, as the original travel code computes it."""
    return (frames // 4) * 4 + 1


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """ "WxH" (or a [w, h] pair) -> (width, height); None or "" -> None. ValueError says what is wrong."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        match = _RESOLUTION.match(value)
        if not match:
            raise ValueError(f"must be 'WIDTHxHEIGHT' like '832x480', got {value!r}")
        value = (int(match.group(1)), int(match.group(2)))
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise ValueError(f"must be 'WIDTHxHEIGHT' like '832x480', got {value!r}")
    width, height = value
    if not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_SIDE for v in value):
        raise ValueError(f"width and height must be integers in [8, {MAX_SIDE}], got {width}x{height}")
    return (width, height)


def _load_image(value: Any, field: str) -> np.ndarray:
    """A local path, bytes, PIL image or array -> uint8 (H, W, 3)."""
    from PIL import Image

    from Wan2GP.video import load_image, to_uint8_frames

    if isinstance(value, str):
        if re.match(r"^[a-z]+://", value):
            raise ValueError(f"{value!r} is a URL: the engine reads local files only (storage fetches URLs)")
        if not os.path.isfile(value):
            raise ValueError(f"no such file: {value}")
        return load_image(value)
    if isinstance(value, bytes | bytearray | os.PathLike):
        return load_image(value if not isinstance(value, bytearray) else bytes(value))
    if isinstance(value, Image.Image):
        return np.array(value.convert("RGB"), dtype=np.uint8)
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] == 3:
        return to_uint8_frames(value[None])[0]
    raise ValueError(f"must be an image file path, bytes or an (H, W, 3) array, got {type(value).__name__}")


def _load_video(value: Any) -> np.ndarray:
    """A local path, bytes, (T, H, W, 3) array or list of images -> uint8 (T, H, W, 3)."""
    from Wan2GP.video import decode_video, to_uint8_frames

    if isinstance(value, str):
        if re.match(r"^[a-z]+://", value):
            raise ValueError(f"{value!r} is a URL: the engine reads local files only (storage fetches URLs)")
        if not os.path.isfile(value):
            raise ValueError(f"no such file: {value}")
        return decode_video(value)[0]
    if isinstance(value, bytes | bytearray | os.PathLike):
        return decode_video(bytes(value) if isinstance(value, bytearray) else value)[0]
    if isinstance(value, np.ndarray) and value.ndim == 3:  # (T, H, W) mask
        value = np.repeat(value[..., None], 3, axis=-1)
    if isinstance(value, np.ndarray) and value.ndim == 4 and value.shape[-1] == 3:
        return to_uint8_frames(value)
    if isinstance(value, list | tuple) and value:
        return np.stack([_load_image(v, "frame") for v in value])
    raise ValueError(f"must be a video file path, bytes or a (T, H, W, 3) array, got {type(value).__name__}")


def _names(value: Any) -> list[str]:
    """LoRA names: a list, or one string separated by commas (the original UI's format)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError("must be a list of LoRA names or a comma-separated string")


def _multipliers(value: Any) -> list[float]:
    """LoRA multipliers: a list of numbers, or a string separated by spaces or commas ("1.0 0.8")."""
    if value is None:
        return []
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]  # one number: the multiplier of the one LoRA
    if not isinstance(value, str | list | tuple):
        raise ValueError("must be a list of numbers or a string of numbers separated by spaces or commas")
    items = re.split(r"[\s,]+", value.strip()) if isinstance(value, str) else list(value)
    result = []
    for item in items:
        if item == "":
            continue
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"multiplier {item!r} is not a number") from None
        if not -10.0 <= number <= 10.0:
            raise ValueError(f"multiplier {number} is outside [-10, 10]")
        result.append(number)
    return result


class BaseParams(BaseModel):
    """Fields every generation task accepts."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, arbitrary_types_allowed=True)

    prompt: str = ""
    negative_prompt: str | None = None
    model: str | None = Field(None, validation_alias=AliasChoices("model", "model_name"))
    resolution: tuple[int, int] | None = None  # (width, height), parsed from "WxH"
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    flow_shift: float | None = Field(None, gt=0.0, le=100.0)
    sample_solver: str | None = None
    fps: int | None = Field(None, ge=1, le=120)
    activated_loras: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("activated_loras", "lora_names")
    )
    loras_multipliers: list[float] = Field(
        default_factory=list, validation_alias=AliasChoices("loras_multipliers", "lora_multipliers")
    )
    additional_loras: dict[str, float] = Field(default_factory=dict)
    use_causvid_lora: bool = False
    use_lighti2x_lora: bool = False

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return parse_resolution(value)

    @field_validator("sample_solver")
    @classmethod
    def _known_solver(cls, value: str | None) -> str | None:
        if value is not None and value not in ("unipc", "euler"):
            raise ValueError(f"must be 'unipc' or 'euler', got {value!r}")
        return value

    @field_validator("activated_loras", mode="before")
    @classmethod
    def _parse_names(cls, value: Any) -> list[str]:
        return _names(value)

    @field_validator("loras_multipliers", mode="before")
    @classmethod
    def _parse_multipliers(cls, value: Any) -> list[float]:
        return _multipliers(value)

    @field_validator("additional_loras", mode="before")
    @classmethod
    def _parse_additional(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, list):  # a list of names: multiplier 1.0 each
            return dict.fromkeys(_names(value), 1.0)
        return value

    @model_validator(mode="after")
    def _check_multipliers(self) -> BaseParams:
        if len(self.loras_multipliers) > len(self.activated_loras):
            raise ValueError(
                f"loras_multipliers has {len(self.loras_multipliers)} values for "
                f"{len(self.activated_loras)} activated_loras"
            )
        return self

    def lora_requests(self) -> list[tuple[str, float]]:
        """(name or path, multiplier) of the LoRAs this task asks for by name."""
        multipliers = self.loras_multipliers + [1.0] * (
            len(self.activated_loras) - len(self.loras_multipliers)
        )
        return list(zip(self.activated_loras, multipliers, strict=True)) + list(self.additional_loras.items())


class VideoParams(BaseParams):
    """Text-to-video (and the base of every Wan family)."""

    video_length: int | None = Field(None, ge=1, le=MAX_FRAMES)

    @field_validator("video_length")
    @classmethod
    def _quantize(cls, value: int | None) -> int | None:
        return None if value is None else quantize_frames(value)


def _image_field(value: Any, info) -> np.ndarray | None:
    if value is None or (isinstance(value, str) and value == ""):
        return None
    return _load_image(value, info.field_name)


class ImageToVideoParams(VideoParams):
    """Image-to-video: ``image_start`` is the first frame; with ``image_end`` it is first-last-frame."""

    image_start: Any = None
    image_end: Any = None

    _image = field_validator("image_start", "image_end", mode="before")(_image_field)

    @model_validator(mode="after")
    def _needs_start(self) -> ImageToVideoParams:
        if self.image_start is None:
            raise ValueError("image_start: required for image-to-video (a local image path, bytes or array)")
        return self


class FirstLastFrameParams(ImageToVideoParams):
    @model_validator(mode="after")
    def _needs_end(self) -> FirstLastFrameParams:
        if self.image_end is None:
            raise ValueError("image_end: required for first-last-frame-to-video")
        return self


class VaceParams(VideoParams):
    """VACE: a guide (control) video, an optional mask video (white = generate) and reference images."""

    video_guide: Any = None
    video_mask: Any = None
    image_refs: list[Any] = Field(default_factory=list)
    video_prompt_type: str | None = None
    control_net_weight: float = Field(1.0, ge=0.0, le=2.0)
    control_net_weight2: float | None = Field(None, ge=0.0, le=2.0)

    @field_validator("video_guide", "video_mask", mode="before")
    @classmethod
    def _video(cls, value: Any) -> np.ndarray | None:
        if value is None or (isinstance(value, str) and value == ""):
            return None
        return _load_video(value)

    @field_validator("image_refs", mode="before")
    @classmethod
    def _refs(cls, value: Any) -> list[np.ndarray]:
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            value = [value]
        return [_load_image(v, "image_refs") for v in value]

    @model_validator(mode="after")
    def _needs_guide(self) -> VaceParams:
        if self.video_guide is None and not self.image_refs:
            raise ValueError("video_guide: required for VACE tasks (or give image_refs)")
        if self.video_mask is not None and self.video_guide is None:
            raise ValueError("video_mask: given without a video_guide")
        return self


class FluxParams(BaseParams):
    """Flux text-to-image; ``video_length`` is the number of images, as in the original."""

    video_length: int = Field(1, ge=1, le=16)


class MagicEditParams(BaseParams):
    """``magic_edit``: a Flux Kontext edit of ``image_url`` (a local path by the time the engine sees it)."""

    image_url: Any
    prompt: str = Field(min_length=1)
    in_scene: bool = False

    _image = field_validator("image_url", mode="before")(_image_field)

    @model_validator(mode="after")
    def _needs_image(self) -> MagicEditParams:
        if self.image_url is None:
            raise ValueError("image_url: required for magic_edit")
        return self


class SingleImageParams(BaseParams):
    """``single_image``: one frame from the task's model, saved as PNG (any ``video_length`` is ignored)."""


class GenerateVideoParams(VaceParams, ImageToVideoParams):
    """``generate_video``: every video field optional; the model's family decides what is required."""

    @model_validator(mode="after")
    def _needs_start(self) -> GenerateVideoParams:  # overrides the i2v requirement
        return self

    @model_validator(mode="after")
    def _needs_guide(self) -> GenerateVideoParams:  # overrides the VACE requirement
        return self


FAMILY_PARAMS: dict[str, type[BaseParams]] = {
    "t2v": VideoParams,
    "i2v": ImageToVideoParams,
    "flf2v": FirstLastFrameParams,
    "vace": VaceParams,
    "flux": FluxParams,
    "flux_kontext": MagicEditParams,
    "single_image": SingleImageParams,
    "generate_video": GenerateVideoParams,
}


def params_class(task_type: str) -> type[BaseParams]:
    if task_type in FAMILY_PARAMS:
        return FAMILY_PARAMS[task_type]
    if task_type not in TASK_FAMILIES:
        raise UnsupportedTaskType(
            f"task_type {task_type!r} is not generated by this engine; supported: {', '.join(TASK_FAMILIES)}"
        )
    return FAMILY_PARAMS[TASK_FAMILIES[task_type]]


def parse_params(task_type: str, params: dict[str, Any]) -> BaseParams:
    """Validate ``params`` of ``task_type``; raises pydantic.ValidationError naming each bad field."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    return params_class(task_type).model_validate(params)
