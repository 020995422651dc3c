"""Task params: one pydantic model per family, accepting the names existing clients send
(docs/compatibility.md lists every key of the original and what happens to it).

Known keys are validated with messages that name the field. Nothing is silently ignored: a key of the
original that would change the output but needs what is not installed here (uni3c, structure guidance,
preprocessors...) is refused with a message naming it (:data:`REFUSED_KEYS`), unless its value asks for
nothing; every other key this engine does not act on is reported by :meth:`BaseParams.ignored_params` with
the reason (:data:`IGNORED_KEYS`, or "unknown"), which the engine writes into the artifact's metadata.
Image and video inputs are local paths, bytes or arrays here: fetching URLs belongs to ``storage/``. They
are decoded during validation, so a broken input fails as a validation error of its field before any model
is loaded.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from Wan2GP.catalog import TASK_FAMILIES
from Wan2GP.errors import UnsupportedTaskType
from Wan2GP.phases import Multiplier
from Wan2GP.postprocess import (
    DEFAULT_GRAIN_SATURATION,
    SPATIAL_SCALES,
    TEMPORAL_FACTORS,
    PostProcess,
    check_choice,
    check_fraction,
)
from Wan2GP.solvers import SOLVERS

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


# ---------------------------------------------------------------------------------------------------------
# Keys of the original this engine does not act on: the one table (docs/compatibility.md mirrors it)
# ---------------------------------------------------------------------------------------------------------

_NOT_INSTALLED = "which are not installed here"
_UNI3C = f"uni3c needs its guidance weights (the Uni3C ControlNet), {_NOT_INSTALLED}"
_STRUCTURE = (
    f"structure guidance needs its preprocessors (optical flow, depth, canny) and uni3c weights, {_NOT_INSTALLED}; "
    "send a processed guide as video_guide instead"
)
_VID2VID = "re-noising an input video (video-to-video) is not supported by this engine"

# key -> why it is refused. Refused only when its value asks for something (see _asks_nothing).
REFUSED_KEYS: dict[str, str] = {
    "use_uni3c": _UNI3C,
    "uni3c_guide_video": _UNI3C,
    "structure_video_path": _STRUCTURE,
    "structure_videos": _STRUCTURE,
    "structure_guidance": _STRUCTURE,
    "structure_type": _STRUCTURE,
    "structure_video_type": _STRUCTURE,
    "structure_guidance_video_url": _STRUCTURE,
    "structure_motion_video_url": _STRUCTURE,
    "video_source": _VID2VID,
    "vid2vid_init_video": _VID2VID,
    "enhance_prompt": f"prompt enhancement needs a vision-language model, {_NOT_INSTALLED}; send the final prompt",
    "prompt_enhancer": f"prompt enhancement needs a vision-language model, {_NOT_INSTALLED}; send the final prompt",
    "audio_guide": f"audio-driven generation needs audio models, {_NOT_INSTALLED}",
    "slg_switch": "skip-layer guidance is not implemented by the diffusers pipelines used here",
    "cfg_star_switch": "CFG-Zero* is not implemented by the diffusers pipelines used here",
    "use_svi": "SVI (stable video infinity) continuation is not supported",
    "svi2pro": "SVI (stable video infinity) continuation is not supported",
    "hires_scale": "the hires-fix second pass is not supported",
    "repeat_generation": "the engine makes one output per task; queue one task per output",
    "sliding_window_size": "sliding-window long video generation is not supported; use travel_orchestrator",
    "image_guide": "image control guides are not supported",
    "image_mask": "image control masks are not supported",
}
# Output post-processing (Wan2GP/postprocess.py) is honoured on a generation task's output. An orchestration
# passing it on would apply it to each of its steps' outputs (travel: every segment, before the stitch), not
# to its final video as the original's single generation does, so orchestrations refuse it.
_POSTPROCESS_IN_ORCHESTRATION = (
    "output post-processing is honoured on generation tasks only, not in orchestrations (it would run on "
    "every segment before the stitch); travel has upscale_factor, or post-process with a generation task"
)
ORCHESTRATION_REFUSED_KEYS: dict[str, str] = {
    "temporal_upsampling": _POSTPROCESS_IN_ORCHESTRATION,
    "spatial_upsampling": _POSTPROCESS_IN_ORCHESTRATION,
    "film_grain_intensity": _POSTPROCESS_IN_ORCHESTRATION,
}
# Values that ask for nothing, per key (default: None, False, 0, "", [], {}).
_INERT_VALUES: dict[str, tuple] = {
    "cfg_star_switch": (0, False, None),
    "repeat_generation": (1, None),
}

_RUN_BOOKKEEPING = "bookkeeping of the original's worker (logs, folders); the service keeps its own"
_CLIENT_STATE = "client UI state; it does not change what is generated"
_UNI3C_ONLY = "only read together with use_uni3c, which is refused when on"
_SLG_ONLY = "only read together with slg_switch, which is refused when on"
# key -> why it is accepted and not acted on (nothing it changes is produced differently here).
IGNORED_KEYS: dict[str, str] = {
    "debug_mode_enabled": _RUN_BOOKKEEPING,
    "skip_cleanup_enabled": _RUN_BOOKKEEPING,
    "output_dir": _RUN_BOOKKEEPING,
    "custom_output_dir": _RUN_BOOKKEEPING,
    "main_output_dir_for_run": _RUN_BOOKKEEPING,
    "current_run_base_output_dir": _RUN_BOOKKEEPING,
    "override_profile": "the memory profile is chosen per deployment, not per task",
    "tea_cache_setting": "TeaCache skips steps to save time; every step runs exactly here",
    "tea_cache_start_step_perc": "TeaCache skips steps to save time; every step runs exactly here",
    "multi_images_gen_type": "the engine makes one output per task",
    "cfg_zero_step": "CFG-Zero* (cfg_star_switch) is not implemented; refused when switched on",
    "slg_layers": _SLG_ONLY,
    "slg_start_perc": _SLG_ONLY,
    "slg_end_perc": _SLG_ONLY,
    "uni3c_strength": _UNI3C_ONLY,
    "uni3c_start_percent": _UNI3C_ONLY,
    "uni3c_end_percent": _UNI3C_ONLY,
    "uni3c_frame_policy": _UNI3C_ONLY,
    "uni3c_keep_on_gpu": _UNI3C_ONLY,
    "uni3c_zero_empty_frames": _UNI3C_ONLY,
    "uni3c_blackout_last_frame": _UNI3C_ONLY,
    "structure_video_motion_strength": "only read together with structure guidance, which is refused",
    "structure_video_treatment": "only read together with structure guidance, which is refused",
    "structure_canny_intensity": "only read together with structure guidance, which is refused",
    "structure_depth_contrast": "only read together with structure guidance, which is refused",
    "embedded_guidance_scale": "Flux's distilled guidance is guidance_scale here",
    "film_grain_saturation": "only read together with film_grain_intensity (honoured on generation tasks; "
    "refused in orchestrations)",
    "RIFLEx_setting": "RIFLEx only matters past the trained length; positions are the pipeline's own",
    "priority": "queue order is the tasks table's own priority, not a generation parameter",
    "model_type": _CLIENT_STATE,
    "motion_mode": _CLIENT_STATE,
    "amount_of_motion": _CLIENT_STATE,
    "advanced_mode": _CLIENT_STATE,
    "shot_id": _CLIENT_STATE,
    "generation_name": _CLIENT_STATE,
    "random_seed": _CLIENT_STATE,
    "add_in_position": _CLIENT_STATE,
    "thumbnail_url": "the output's thumbnail: completing the task writes its own into the params, as the "
    "original does",
    "show_input_images": "the original drew the input images above the video as a preview; not drawn here",
}


def _asks_nothing(key: str, value: Any) -> bool:
    """Whether ``value`` of a refused key asks for nothing (so accepting it changes nothing)."""
    if key in _INERT_VALUES:
        return value in _INERT_VALUES[key]
    return value is None or value is False or value == 0 or value in ("", [], {})


def refused_reason(key: str, value: Any, generation: bool = False) -> str | None:
    """Why ``key: value`` cannot be honoured here, or None when it can be accepted. ``generation``: asked
    by a generation task's params (which honour output post-processing), else by an orchestration's."""
    if key in REFUSED_KEYS and not _asks_nothing(key, value):
        return REFUSED_KEYS[key]
    if not generation and key in ORCHESTRATION_REFUSED_KEYS and not _asks_nothing(key, value):
        return ORCHESTRATION_REFUSED_KEYS[key]
    return None


def ignored_reason(key: str, value: Any, what: str) -> str:
    """Why an accepted ``key`` that ``what`` (e.g. "Video tasks") does not act on is ignored."""
    if key in IGNORED_KEYS:
        return IGNORED_KEYS[key]
    if key in REFUSED_KEYS:
        return f"{value!r} asks for nothing; {REFUSED_KEYS[key]}"
    if key in ORCHESTRATION_REFUSED_KEYS:
        return f"{value!r} asks for nothing; {ORCHESTRATION_REFUSED_KEYS[key]}"
    return f"unknown key: not a parameter of {what}"


def _names(value: Any) -> list[str]:
    """LoRA names: a list, or one string separated by commas (the original UI's format)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError("must be a list of LoRA names or a comma-separated string")


def _multipliers(value: Any) -> list[Multiplier]:
    """LoRA multipliers, as the original reads them: a list, or a string separated by spaces or newlines
    ("1.0 0.8"). Each is a number or a phase string: "1.0;0" (phase 1, phase 2), "0.9,0.7;0" (per step)."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ValueError(f"must be numbers or strings like '1.0;0', got {value!r}")
    if isinstance(value, int | float):
        value = [value]
    if isinstance(value, str):
        lines = [line.strip() for line in value.replace("\r", "").split("\n")]
        value = (
            " ".join(line for line in lines if line and not line.startswith("#")).replace("|", " ").split()
        )
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list or a space-separated string, got {type(value).__name__}")
    result = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise ValueError(f"multiplier {item!r} is not a number or a string like '1.0;0'")
        result.append(Multiplier.parse(str(item)))
    return result


class PhaseLora(BaseModel):
    """One LoRA of a phase: ``url`` is a URL, a file name in the LoRA folders, or "" (skipped)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    multiplier: float | str = 1.0

    @field_validator("multiplier")
    @classmethod
    def _parse(cls, value: float | str) -> float | str:
        Multiplier.parse(str(value))  # fails naming the bad value
        return value


class Phase(BaseModel):
    model_config = ConfigDict(extra="allow")

    phase: int | None = None
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    loras: list[PhaseLora] = Field(default_factory=list)


class PhaseConfig(BaseModel):
    """The original's ``phase_config``: the run's phases, with their steps, guidance and LoRAs. Its
    steps, flow shift and solver replace the task's (as the original's parse_phase_config does)."""

    model_config = ConfigDict(extra="forbid")

    num_phases: int | None = Field(None, ge=2, le=3)
    steps_per_phase: list[int] = Field(default_factory=lambda: [2, 2, 2])
    flow_shift: float = Field(5.0, gt=0.0, le=100.0)
    sample_solver: str = "euler"
    model_switch_phase: int = Field(2, ge=1, le=2)
    phases: list[Phase]
    svi2pro: bool = False

    @field_validator("steps_per_phase")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not all(1 <= v <= 100 for v in value):
            raise ValueError(f"every phase needs 1 to 100 steps, got {value}")
        return value

    @field_validator("sample_solver")
    @classmethod
    def _known_solver(cls, value: str) -> str:
        if value == "":  # the original's parse_phase_config schedules "" as unipc
            return "unipc"
        if value not in SOLVERS:
            raise ValueError(f"must be one of {', '.join(SOLVERS)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PhaseConfig:
        # The original trusts the phases list when num_phases disagrees with it.
        count = len(self.phases)
        if count not in (2, 3):
            raise ValueError(f"phases: must have 2 or 3 phases, got {count}")
        if len(self.steps_per_phase) != count:
            raise ValueError(f"steps_per_phase has {len(self.steps_per_phase)} values for {count} phases")
        if self.svi2pro:
            raise ValueError("svi2pro: SVI (stable video infinity) continuation is not supported")
        self.num_phases = count
        return self

    def guidance(self) -> list[float]:
        """Phase guidance, with the original's defaults (3.0 for phase 1, 1.0 after)."""
        return [p.guidance_scale if p.guidance_scale is not None else (3.0 if i == 0 else 1.0)
                for i, p in enumerate(self.phases)]  # fmt: skip

    def lora_requests(self) -> list[tuple[str, Multiplier]]:
        """Each LoRA named in any phase, with its per-phase multiplier ("0" in the phases without it)."""
        names = list(
            dict.fromkeys(lora.url.strip() for p in self.phases for lora in p.loras if lora.url.strip())
        )
        requests = []
        for name in names:
            entries = []
            for phase in self.phases:
                lora = next((lo for lo in phase.loras if lo.url.strip() == name), None)
                entries.append(str(lora.multiplier) if lora is not None else "0")
            requests.append((name, Multiplier.parse(";".join(entries))))
        return requests


class BaseParams(BaseModel):
    """Fields every generation task accepts."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, arbitrary_types_allowed=True)

    prompt: str = ""
    negative_prompt: str | None = None
    model: str | None = Field(None, validation_alias=AliasChoices("model", "model_name"))
    resolution: tuple[int, int] | None = None  # (width, height), parsed from "WxH"
    seed: int = Field(-1, ge=-1, le=2**32 - 1, validation_alias=AliasChoices("seed", "seed_to_use"))
    num_inference_steps: int | None = Field(
        None, ge=1, le=200, validation_alias=AliasChoices("num_inference_steps", "steps")
    )
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    flow_shift: float | None = Field(None, gt=0.0, le=100.0)
    sample_solver: str | None = None
    fps: int | None = Field(None, ge=1, le=120)
    activated_loras: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("activated_loras", "lora_names")
    )
    loras_multipliers: list[Multiplier] = Field(
        default_factory=list, validation_alias=AliasChoices("loras_multipliers", "lora_multipliers")
    )
    additional_loras: dict[str, float] = Field(default_factory=dict)
    use_causvid_lora: bool = False
    use_lighti2x_lora: bool = False
    # Denoising phases (see Wan2GP.phases); absent values come from the model's definition.
    guidance_phases: int | None = Field(None, ge=1, le=3)
    guidance2_scale: float | None = Field(None, ge=0.0, le=50.0)
    guidance3_scale: float | None = Field(None, ge=0.0, le=50.0)
    switch_threshold: float | None = Field(None, ge=0.0, le=1000.0)
    switch_threshold2: float | None = Field(None, ge=0.0, le=1000.0)
    model_switch_phase: int | None = Field(None, ge=1, le=2)
    phase_config: PhaseConfig | None = None
    # 1.0 (or absent) = generate from pure noise; lower values would re-noise an input video (refused).
    denoising_strength: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("denoising_strength", "denoise_strength", "strength"),
    )
    # Output post-processing, run on the CPU after the replica (Wan2GP/postprocess.py); "" / 0 = off.
    temporal_upsampling: str = ""  # "rife2" / "rife4"
    spatial_upsampling: str = ""  # "lanczos1.5" / "lanczos2"
    film_grain_intensity: float = 0.0
    film_grain_saturation: float = DEFAULT_GRAIN_SATURATION

    @field_validator("temporal_upsampling", "spatial_upsampling", mode="before")
    @classmethod
    def _known_upsampling(cls, value: Any, info) -> str:
        choices = TEMPORAL_FACTORS if info.field_name == "temporal_upsampling" else SPATIAL_SCALES
        return check_choice(info.field_name, value, choices)

    @field_validator("film_grain_intensity", "film_grain_saturation", mode="before")
    @classmethod
    def _grain_fraction(cls, value: Any, info) -> float:
        default = 0.0 if info.field_name == "film_grain_intensity" else DEFAULT_GRAIN_SATURATION
        return check_fraction(info.field_name, value, default)

    @model_validator(mode="after")
    def _upsampled_within_max_side(self) -> BaseParams:
        if self.resolution is not None and self.spatial_upsampling:
            width, height = self.postprocess().output_size(*self.resolution)
            if max(width, height) > MAX_SIDE:
                raise ValueError(
                    f"spatial_upsampling: {self.spatial_upsampling!r} turns {self.resolution[0]}x"
                    f"{self.resolution[1]} into {width}x{height}, over {MAX_SIDE} a side"
                )
        return self

    def postprocess(self) -> PostProcess:
        """The output post-processing this task asks for (``PostProcess.active`` False when none)."""
        return PostProcess(
            self.temporal_upsampling,
            self.spatial_upsampling,
            self.film_grain_intensity,
            self.film_grain_saturation,
        )

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return parse_resolution(value)

    @field_validator("sample_solver")
    @classmethod
    def _known_solver(cls, value: str | None) -> str | None:
        if value == "":  # the original's "model default"
            return None
        if value is not None and value not in SOLVERS:
            raise ValueError(f"must be one of {', '.join(SOLVERS)}, got {value!r}")
        return value

    @field_validator("denoising_strength")
    @classmethod
    def _no_vid2vid(cls, value: float | None) -> float | None:
        if value is not None and value < 1.0:
            raise ValueError(
                f"{value} < 1 asks to re-noise an input video: {_VID2VID}; send 1.0 or leave it out"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """Keys that would change the output but cannot be honoured here: an error located at each."""
        if not isinstance(data, dict):
            return data
        errors = [
            InitErrorDetails(
                type=PydanticCustomError("refused", "{reason}", {"reason": reason}), loc=(key,), input=value
            )
            for key, value in data.items()
            if (reason := refused_reason(key, value, generation=True))
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    def ignored_params(self) -> dict[str, str]:
        """key -> why, for every key of this task that the engine accepted and does not act on."""
        what = f"{type(self).__name__.removesuffix('Params')} tasks"
        extra = (self.model_extra or {}).items()
        ignored = {key: ignored_reason(key, value, what) for key, value in extra if value is not None}
        ignored.update(self._ignored_by_validation())
        return ignored

    def _ignored_by_validation(self) -> dict[str, str]:
        """Declared keys a family's validation decided not to use (e.g. by video_prompt_type letters)."""
        ignored = dict(getattr(self, "_dropped", None) or {})
        if self.phase_config is not None:
            replaced = "replaced by phase_config, as in the original"
            for name in ("activated_loras", "loras_multipliers", "num_inference_steps", "flow_shift",
                         "sample_solver", "guidance_phases", "guidance_scale", "guidance2_scale",
                         "guidance3_scale", "switch_threshold", "switch_threshold2", "model_switch_phase"):  # fmt: skip
                if name in self.model_fields_set:
                    ignored[name] = replaced
        return ignored

    @field_validator("activated_loras", mode="before")
    @classmethod
    def _parse_names(cls, value: Any) -> list[str]:
        return _names(value)

    @field_validator("loras_multipliers", mode="before")
    @classmethod
    def _parse_multipliers(cls, value: Any) -> list[Multiplier]:
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

    def lora_requests(self) -> list[tuple[str, Multiplier]]:
        """(name, multiplier) of the LoRAs this task asks for. A phase_config's LoRAs replace
        activated_loras / loras_multipliers, as in the original."""
        additional = [(name, Multiplier.constant(value)) for name, value in self.additional_loras.items()]
        if self.phase_config is not None:
            return self.phase_config.lora_requests() + additional
        multipliers = self.loras_multipliers + [Multiplier.constant(1.0)] * (
            len(self.activated_loras) - len(self.loras_multipliers)
        )
        return list(zip(self.activated_loras, multipliers, strict=True)) + additional


class VideoParams(BaseParams):
    """Text-to-video (and the base of every Wan family)."""

    video_length: int | None = Field(
        None, ge=1, le=MAX_FRAMES, validation_alias=AliasChoices("video_length", "num_frames")
    )

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

    # "image" / "image_url" are the original's names for the start image of image-to-X tasks.
    image_start: Any = Field(None, validation_alias=AliasChoices("image_start", "image", "image_url"))
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


# video_prompt_type letters (the original's VACE control string) this engine acts on.
PROMPT_TYPE_LETTERS = {
    "V": "use video_guide as given (VACE raw format)",
    "U": "use video_guide unchanged",
    "M": "use video_mask (white = generate)",
    "A": "use video_mask (white = generate)",
    "N": "invert video_mask",
    "I": "use image_refs as reference images",
}
# Letters that ask the original to preprocess the guide with a model that is not installed here.
PREPROCESSOR_LETTERS = {"P": "pose", "D": "depth", "E": "canny edges", "S": "shapes", "L": "optical flow",
                        "C": "recolorize"}  # fmt: skip


class VaceParams(VideoParams):
    """VACE: a guide (control) video, an optional mask video (white = generate) and reference images.

    With ``video_prompt_type`` the inputs are used as its letters say, as in the original: the guide only
    with V/U, the mask only with M/A (inverted with N), the reference images only with I; an input given
    without its letter is not used and reported in :meth:`ignored_params`.
    """

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

    _dropped: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("video_prompt_type")
    @classmethod
    def _known_letters(cls, value: str | None) -> str | None:
        if value is None:
            return None
        preprocessors = [f"{c} ({PREPROCESSOR_LETTERS[c]})" for c in value if c in PREPROCESSOR_LETTERS]
        if preprocessors:
            raise ValueError(
                f"{', '.join(preprocessors)}: the guide preprocessors are {_NOT_INSTALLED.removeprefix('which are ')}; "
                "send a processed guide with 'V' (or 'UV')"
            )
        unknown = sorted({c for c in value if c not in PROMPT_TYPE_LETTERS})
        if unknown:
            raise ValueError(
                f"letters {''.join(unknown)!r} are not supported; supported: "
                + "; ".join(f"{k}: {v}" for k, v in PROMPT_TYPE_LETTERS.items())
            )
        return value

    @model_validator(mode="after")
    def _apply_prompt_type(self) -> VaceParams:
        if self.control_net_weight2 is not None:
            self._dropped["control_net_weight2"] = (
                "weights a second VACE control stream, which only two preprocessor letters create (refused here)"
            )
        letters = self.video_prompt_type
        if letters is None:
            return self
        wanted = {
            "video_guide": bool(set(letters) & {"V", "U"}),
            "video_mask": bool(set(letters) & {"M", "A"}),
            "image_refs": "I" in letters,
        }
        for name, used in wanted.items():
            value = getattr(self, name)
            if not used and value is not None and not (isinstance(value, list) and not value):
                setattr(self, name, [] if name == "image_refs" else None)
                self._dropped[name] = (
                    f"video_prompt_type {letters!r} does not use it (the original ignores it too)"
                )
        if "N" in letters and self.video_mask is not None:
            self.video_mask = 255 - self.video_mask
        return self

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
    from Wan2GP.image_params import IMAGE_TASK_PARAMS  # image task types: Wan2GP/image_params.py

    if task_type in IMAGE_TASK_PARAMS:
        return IMAGE_TASK_PARAMS[task_type]
    if task_type in FAMILY_PARAMS:
        return FAMILY_PARAMS[task_type]
    if task_type not in TASK_FAMILIES:
        raise UnsupportedTaskType(
            f"task_type {task_type!r} is not generated by this engine; supported: {', '.join(TASK_FAMILIES)}"
        )
    return FAMILY_PARAMS[TASK_FAMILIES[task_type]]


def postprocess_request(task_type: str, params: dict[str, Any]) -> PostProcess | None:
    """The output post-processing a generation task asks for, read from its params without parsing the
    rest (no inputs decoded); None when it asks for none or its task type has no such keys (image models).
    ValueError names a bad key (POST validated them already with the params model)."""
    if not issubclass(params_class(task_type), BaseParams):
        return None
    post = PostProcess.from_params(params)
    return post if post.active else None


def parse_params(task_type: str, params: dict[str, Any]) -> BaseParams:
    """Validate ``params`` of ``task_type``; raises pydantic.ValidationError naming each bad field."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    return params_class(task_type).model_validate(params)
