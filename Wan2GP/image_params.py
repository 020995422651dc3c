"""Params of the image-model task types, with the original's keys and meanings
(source/task_conversion.py and source/model_handlers/qwen_handler.py of Headless-Wan2GP).

Every task type has a recipe: the defaults the original's handler sets (steps, guidance, the Lightning LoRA and
its strength, the task's own LoRA). Keys that would change the output but are not implemented here are refused
naming the key (:data:`REFUSED_KEYS`); every other key the engine does not act on is reported in the artifact's
``ignored_params`` with the reason (:data:`IGNORED_KEYS`, or "unknown key").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from Wan2GP.params import _image_field, _names, parse_resolution

QWEN_MAX_SIDE = 1200  # the original caps every Qwen resolution to 1200 px a side, keeping the aspect ratio
Z_IMAGE_AUTO_PIXELS = 1024 * 1024  # z_image_turbo_i2i with image_size "auto": the input's aspect at ~1 MP
# WGP's Qwen negative prompt when a task gives none (models/qwen/qwen_main.py).
QWEN_DEFAULT_NEGATIVE = "text, watermark, copyright, blurry, low resolution"
LIGHTNING_EDIT = "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors"
LIGHTNING_T2I = "Qwen-Image-Lightning-4steps-V2.0-bf16.safetensors"
INPAINT_LORA = "qwen_image_edit_inpainting.safetensors"
ANNOTATE_LORA = "in_scene_pure_squares_flipped_450_lr_000006700.safetensors"
STYLE_LORA = "style_transfer_qwen_edit_2_000011250.safetensors"
SUBJECT_LORA = "in_subject_qwen_edit_2_000006750.safetensors"
SCENE_LORA = "in_scene_different_object_000010500.safetensors"


@dataclass(frozen=True)
class Recipe:
    """What the original's handler sets for a task type when the task does not say."""

    steps: int
    guidance: float
    lightning: str | None = None  # the Lightning LoRA file it adds
    lightning_strength: float = 1.0  # its default ``lightning_lora_strength_phase_1``
    task_lora: str | None = None  # the task's own LoRA, at 1.0
    resolution: tuple[int, int] | None = None  # default resolution (else the model's)


RECIPES: dict[str, Recipe] = {
    "qwen_image": Recipe(steps=4, guidance=3.5, lightning=LIGHTNING_T2I, resolution=(1024, 1024)),
    "qwen_image_edit": Recipe(steps=12, guidance=1.0, lightning=LIGHTNING_EDIT, lightning_strength=0.85),
    "qwen_image_style": Recipe(steps=12, guidance=1.0, lightning=LIGHTNING_EDIT, lightning_strength=0.85),
    "image_inpaint": Recipe(
        steps=12, guidance=1.0, lightning=LIGHTNING_EDIT, lightning_strength=0.75, task_lora=INPAINT_LORA
    ),
    "annotated_image_edit": Recipe(
        steps=12, guidance=1.0, lightning=LIGHTNING_EDIT, lightning_strength=0.75, task_lora=ANNOTATE_LORA
    ),
    "z_image_turbo": Recipe(steps=8, guidance=0.0),
    "z_image_turbo_i2i": Recipe(steps=12, guidance=0.0),
}

# Keys of the original that change the output and are not implemented here: refused unless their value asks
# for nothing (None, False, "", 0, [] or {}).
REFUSED_KEYS: dict[str, str] = {
    "hires_scale": "the two-pass hires fix is not implemented for image models here",
    "phase_config": "denoising phases are not implemented for image models here",
    "image_refs": "extra reference images are not implemented for image models here",
    "image_mask": "mask-guided editing is not implemented here (image_inpaint takes mask_url)",
    "video_guide": "image models take no guide video",
    "video_mask": "image models take no mask video",
    "use_causvid_lora": "the CausVid LoRA is a Wan LoRA",
    "use_lighti2x_lora": "the LightX2V LoRA is a Wan LoRA",
}
# Keys the original accepts and that do not change the output here, with the reason.
IGNORED_KEYS: dict[str, str] = {
    "system_prompt": "the original passes it to its Qwen pipeline, which does not use it",
    "lightning_lora_strength_phase_2": "applies to the second pass of the hires fix only",
    "hires_steps": "applies to the hires fix only (hires_scale)",
    "hires_denoise": "applies to the hires fix only (hires_scale)",
    "hires_upscale_method": "applies to the hires fix only (hires_scale)",
    "flow_shift": "Qwen-Image and Z-Image shift their schedule by image size",
    "video_prompt_type": "image tasks fix their own (the original sets 'KI' for edits)",
    "video_length": "image tasks make one image",
    "fps": "image tasks make one image",
    "output_format": "outputs are PNG",
    "enable_base64_output": "outputs are stored files",
    "enable_sync_mode": "tasks always run through the queue",
    "output_dir": "outputs are stored by the service",
    "custom_output_dir": "outputs are stored by the service",
}
_EMPTY = (None, False, "", 0, [], {})
_MULTIPLIER_SPLIT = re.compile(r"[\s,]+")


def _multipliers(value: Any) -> list[float]:
    """LoRA multipliers: numbers, or a string of numbers separated by spaces or commas ("1.0 0.8").
    Phase strings ("1.0;0") are for multi-phase video models and are refused here."""
    if value is None:
        return []
    items = _MULTIPLIER_SPLIT.split(value.strip()) if isinstance(value, str) else list(value)
    result = []
    for item in items:
        if item == "":
            continue
        if isinstance(item, bool):
            raise ValueError(f"multiplier {item!r} is not a number")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(
                f"multiplier {item!r} is not a number (phase multipliers are not used here)"
            ) from None
        if not -10.0 <= number <= 10.0:
            raise ValueError(f"multiplier {number} is outside [-10, 10]")
        result.append(number)
    return result


class ImageTaskParams(BaseModel):
    """Keys every image task accepts."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, arbitrary_types_allowed=True)

    prompt: str = ""
    negative_prompt: str | None = None
    model: str | None = Field(None, validation_alias=AliasChoices("model", "model_name"))
    resolution: tuple[int, int] | None = None  # (width, height) from "WxH"
    seed: int = Field(-1, ge=-1, le=2**32 - 1, validation_alias=AliasChoices("seed", "seed_to_use"))
    num_inference_steps: int | None = Field(
        None, ge=1, le=200, validation_alias=AliasChoices("num_inference_steps", "steps")
    )
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    sample_solver: str | None = None
    activated_loras: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("activated_loras", "lora_names")
    )
    loras_multipliers: list[float] = Field(
        default_factory=list, validation_alias=AliasChoices("loras_multipliers", "lora_multipliers")
    )
    additional_loras: dict[str, float] = Field(default_factory=dict)
    # The original's array form: [{"path": name, "scale": 0.8}] (added to additional_loras).
    loras: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return parse_resolution(value)

    @field_validator("sample_solver")
    @classmethod
    def _known_solver(cls, value: str | None) -> str | None:
        if value in ("", "default"):
            return None
        if value is not None and value != "lightning":
            raise ValueError(f"image models take 'default' or 'lightning', got {value!r}")
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
        if isinstance(value, list):
            return dict.fromkeys(_names(value), 1.0)
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _parse_lora_array(cls, value: Any) -> Any:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError('must be a list of {"path": name, "scale": number}')
        for item in value:
            if not isinstance(item.get("path"), str) or not item["path"].strip():
                raise ValueError('each LoRA needs a "path" naming its file')
            scale = item.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not -10.0 <= scale <= 10.0:
                raise ValueError(f"scale of {item['path']!r} must be a number in [-10, 10], got {scale!r}")
        return value

    @model_validator(mode="after")
    def _checks(self) -> ImageTaskParams:
        if len(self.loras_multipliers) > len(self.activated_loras):
            raise ValueError(
                f"loras_multipliers has {len(self.loras_multipliers)} values for "
                f"{len(self.activated_loras)} activated_loras"
            )
        for key, value in (self.model_extra or {}).items():
            if key in REFUSED_KEYS and value not in _EMPTY:
                raise ValueError(f"{key}: {REFUSED_KEYS[key]}")
            if key == "video_length" and value not in (None, 1):
                raise ValueError(f"video_length: image tasks make one image, got {value!r}")
        return self

    def lora_requests(self) -> list[tuple[str, float]]:
        """(name, multiplier) of the LoRAs the task names itself, in the original's order."""
        multipliers = self.loras_multipliers + [1.0] * (
            len(self.activated_loras) - len(self.loras_multipliers)
        )
        named = list(zip(self.activated_loras, multipliers, strict=True))
        array = [(item["path"].strip(), float(item.get("scale", 1.0))) for item in self.loras]
        return named + array + list(self.additional_loras.items())

    def ignored_params(self) -> dict[str, str]:
        """key -> why, for every key this task accepted and does not act on."""
        ignored = {}
        for key, value in (self.model_extra or {}).items():
            if key in REFUSED_KEYS or value is None:
                continue  # a refused key got here only with a value asking for nothing
            ignored[key] = IGNORED_KEYS.get(key, "unknown key")
        return ignored


class QwenParams(ImageTaskParams):
    """Every Qwen task: the Lightning LoRA's strength (0 runs without it)."""

    lightning_lora_strength_phase_1: float | None = Field(None, ge=0.0, le=10.0)


class QwenImageParams(QwenParams):
    """``qwen_image``: text-to-image."""

    prompt: str = Field(min_length=1)


class QwenEditParams(QwenParams):
    """``qwen_image_edit``: ``image`` (or ``image_url``) edited as ``prompt`` says."""

    image: Any = Field(None, validation_alias=AliasChoices("image", "image_url"))

    _image = field_validator("image", mode="before")(_image_field)

    @model_validator(mode="after")
    def _needs_image(self) -> QwenEditParams:
        if self.image is None:
            raise ValueError("image: 'image' or 'image_url' is required (the image to edit)")
        return self


class QwenMaskedEditParams(QwenParams):
    """``image_inpaint`` / ``annotated_image_edit``: ``image_url`` with ``mask_url`` (white = the marked area),
    composited as the original does: the marked area painted green, then edited."""

    image: Any = Field(None, validation_alias=AliasChoices("image_url", "image"))
    mask_url: Any = None

    _images = field_validator("image", "mask_url", mode="before")(_image_field)

    @model_validator(mode="after")
    def _needs_image_and_mask(self) -> QwenMaskedEditParams:
        if self.image is None:
            raise ValueError("image_url: 'image_url' (or 'image') is required")
        if self.mask_url is None:
            raise ValueError("mask_url: required (white marks the area to change)")
        return self


class QwenStyleParams(QwenParams):
    """``qwen_image_style``: a reference image (style or subject) and LoRA strengths; the prompt is prefixed as
    the original does. Without a reference image it generates from the prompt alone."""

    style_reference_image: Any = None
    subject_reference_image: Any = None
    style_reference_strength: float = Field(0.0, ge=0.0, le=10.0)
    subject_strength: float = Field(0.0, ge=0.0, le=10.0)
    scene_reference_strength: float = Field(0.0, ge=0.0, le=10.0)
    subject_description: str = ""
    in_this_scene: bool = False

    _images = field_validator("style_reference_image", "subject_reference_image", mode="before")(_image_field)

    @field_validator(
        "style_reference_strength", "subject_strength", "scene_reference_strength", mode="before"
    )
    @classmethod
    def _none_is_zero(cls, value: Any) -> Any:
        return 0.0 if value is None else value

    @property
    def reference_image(self) -> np.ndarray | None:
        """The image the edit starts from: the style reference, else the subject reference (as the original)."""
        return (
            self.style_reference_image
            if self.style_reference_image is not None
            else self.subject_reference_image
        )

    def styled_prompt(self) -> str:
        """The prompt with the original's prefixes for style and subject."""
        parts = []
        if self.style_reference_strength > 0.0:
            parts.append("In the style of this image,")
        if self.subject_strength > 0.0 and self.subject_description:
            make = "make" if parts else "Make"
            scene = " in this scene" if self.in_this_scene else ""
            parts.append(f"{make} an image of this {self.subject_description}{scene}:")
        return " ".join(parts) + " " + self.prompt if parts else self.prompt

    def ignored_params(self) -> dict[str, str]:
        ignored = super().ignored_params()
        if self.subject_description and self.subject_strength == 0.0:
            ignored["subject_description"] = "used only with subject_strength > 0, as in the original"
        if self.in_this_scene and not (self.subject_strength > 0.0 and self.subject_description):
            ignored["in_this_scene"] = "used only with subject_strength > 0 and a subject_description"
        if self.style_reference_image is not None and self.subject_reference_image is not None:
            ignored["subject_reference_image"] = "style_reference_image is used when both are given"
        return ignored


class ZImageParams(ImageTaskParams):
    """``z_image_turbo``: text-to-image."""

    prompt: str = Field(min_length=1)


class ZImageToImageParams(ImageTaskParams):
    """``z_image_turbo_i2i``: ``image`` (or ``image_url``) re-noised by ``denoising_strength`` and regenerated.

    As in the original, the output size follows the input image (its aspect ratio at ~1 MP) unless
    ``image_size`` is something other than "auto" and ``resolution`` is given.
    """

    image: Any = Field(None, validation_alias=AliasChoices("image", "image_url"))
    image_size: str = "auto"
    denoising_strength: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        validation_alias=AliasChoices("denoising_strength", "denoise_strength", "strength"),
    )

    _image = field_validator("image", mode="before")(_image_field)

    @model_validator(mode="after")
    def _needs_image(self) -> ZImageToImageParams:
        if self.image is None:
            raise ValueError("image: 'image' or 'image_url' is required for z_image_turbo_i2i")
        return self

    @property
    def uses_resolution(self) -> bool:
        return self.image_size != "auto" and self.resolution is not None

    def ignored_params(self) -> dict[str, str]:
        ignored = super().ignored_params()
        if self.resolution is not None and not self.uses_resolution:
            ignored["resolution"] = (
                "with image_size 'auto' the size follows the input image, as in the original"
            )
        return ignored


IMAGE_TASK_PARAMS: dict[str, type[ImageTaskParams]] = {
    "qwen_image": QwenImageParams,
    "qwen_image_edit": QwenEditParams,
    "qwen_image_style": QwenStyleParams,
    "image_inpaint": QwenMaskedEditParams,
    "annotated_image_edit": QwenMaskedEditParams,
    "z_image_turbo": ZImageParams,
    "z_image_turbo_i2i": ZImageToImageParams,
}


def parse_image_params(task_type: str, params: dict[str, Any]) -> ImageTaskParams:
    """Validate ``params`` of an image task type; raises pydantic.ValidationError naming each bad field."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    return IMAGE_TASK_PARAMS[task_type].model_validate(params)


def cap_qwen_resolution(width: int, height: int) -> tuple[int, int]:
    """The original's cap: a side over 1200 px scales both down to fit 1200, keeping the aspect ratio."""
    if width > QWEN_MAX_SIDE or height > QWEN_MAX_SIDE:
        ratio = min(QWEN_MAX_SIDE / width, QWEN_MAX_SIDE / height)
        return int(width * ratio), int(height * ratio)
    return width, height


def fit_to_image(width: int, height: int, image: np.ndarray, multiple: int) -> tuple[int, int]:
    """The original's "K" sizing of edits: the image's aspect ratio at the area of ``width`` x ``height``,
    each side rounded to ``multiple`` (WGP's calculate_new_dimensions)."""
    image_height, image_width = image.shape[:2]
    scale = math.sqrt(width * height / (image_width * image_height))
    return (
        max(multiple, round(image_width * scale / multiple) * multiple),
        max(multiple, round(image_height * scale / multiple) * multiple),
    )
