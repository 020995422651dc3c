"""Travel between images, without Ray: payload parsing, segment planning, guide videos and stitching.

The Ray DAG (``dag/travel.py``) calls these plain functions; everything here is deterministic and testable
on its own.

Timeline rules (docs/compatibility.md): each segment's frame count is quantized to 4n+1 (``(f // 4) * 4 + 1``); each of
the N-1 overlaps is made even (rounded down) and capped at the shorter neighbour.

Overlap modes (``overlap_mode``, chained VACE runs only): ``"shared"`` (the original before November 2025, our
native default): segment i+1 generates ``frames[i+1]`` frames of which the first ``overlap[i]`` re-generate
clip i's last frames, so the final video has Σ frames − Σ overlaps frames. ``"context"`` (the original since
November 2025 and its default, so the default of the ``orchestrator_details`` form): segment i+1 generates
``frames[i+1] + overlap[i]`` frames (rounded down to 4n+1) whose first ``overlap[i]`` are that context, so the
final video has Σ frames (less 2 per boundary whose overlap is not a multiple of 4).

Output rule: only chained VACE runs are stitched (the original makes a ``travel_stitch`` task for nothing
else). With ``chain_segments: false`` or ``model_type: "i2v"`` every segment is its own clip of ``frames[i]``
frames (each segment's row holds it) and the run's output is the last segment's clip, as the original's
orchestrator completes with the last segment's output when it made no stitch task.

Chained mode (the original's behaviour): segment i+1's guide starts with the last ``overlap[i]`` frames of
clip i (kept), then grey frames (generated), ending on its end anchor (kept). VACE therefore re-generates
those leading frames: the stitch cross-fades clip i's last ``overlap[i]`` frames with clip i+1's first
``overlap[i]`` frames (the re-generated copies of the same frames), so the hand-over is smooth and the length
is exactly Σ frames − Σ overlaps.

Independent mode (``chain_segments: false``): every segment is conditioned only on its start anchor (frame 0)
and end anchor (last frame), so segments can run in parallel; they are not stitched (see the output rule).

Image-to-video mode (``model_type: "i2v"``): every segment is a first/last-frame image-to-video generation
(``flf2v``) from its start anchor to its end anchor, independent of the others (the original chains only VACE
segments), unstitched.

A single anchor image (no ``continue_from_video``): one segment that starts on that image and has no end
image (the original's "single image journey": VACE with only frame 0 kept, or plain image-to-video).

Anchors: without ``continue_from_video`` there are N+1 anchor images for N segments and segment i travels
from anchor i to anchor i+1. With it there are N anchors: segment 0 starts from the last
``continue_overlap`` frames of that video and ends on anchor 0; segment i ends on anchor i.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from Wan2GP.params import MAX_FRAMES, MAX_SIDE, BaseParams, ignored_reason, quantize_frames, refused_reason
from Wan2GP.structure import STRUCTURE_KEYS, StructureGuidance, parse_structure_guidance
from Wan2GP.video import (
    BRIGHTNESS_RANGE,
    MIN_JOIN_FRAMES,
    SATURATION_RANGE,
    adjust_brightness,
    adjust_saturation,
    build_vace_guide,
    colour_match,
    fade,
    fit_resolution,
    mask_to_video,
    stitch,
    upscale,
)

MIN_SEGMENT_FRAMES = 5  # a segment needs distinct first and last frames for its two anchors
DEFAULT_SEED = 12345  # the original's default seed_base
DEFAULT_FPS = 16  # the original's default fps_helpers
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX*×]\s*(\d+)\s*$")
TRAVEL_MODES = ("vace", "i2v")  # the original's model_type values
OVERLAP_MODES = ("shared", "context")  # see the module docstring


class PostProcess(BaseModel):
    """The post-processing chain, in the original's order: per clip saturation, brightness (clips after
    the first), colour match (every clip); then the cross-fade stitch, fades, upscale.
    ``show_input_images`` is accepted for compatibility and ignored (the original drew the anchor images
    beside the video; nothing here renders it)."""

    model_config = ConfigDict(frozen=True)

    colour_match: bool = False
    saturation: float = Field(1.0, ge=SATURATION_RANGE[0], le=SATURATION_RANGE[1])  # 1.0 = unchanged
    brightness: float = Field(0.0, ge=BRIGHTNESS_RANGE[0], le=BRIGHTNESS_RANGE[1])  # additive: 0 = unchanged
    fade_in: int = Field(0, ge=0)
    fade_out: int = Field(0, ge=0)
    upscale_factor: float | None = Field(None, gt=0.0, le=8.0)
    crossfade_sharpness: float = Field(0.0, ge=0.0, le=10.0)
    show_input_images: bool = False


class TravelPlan(BaseModel):
    """A validated travel run: everything already expanded to one value per segment (or per boundary)."""

    model_config = ConfigDict(frozen=True)

    run_id: str = Field(min_length=1)
    anchors: list[str]
    prompts: list[str]
    negative_prompts: list[str]  # "" = the model's default negative prompt
    segment_frames: list[int]
    overlaps: list[int]  # overlaps[i] joins segment i and i+1
    width: int = Field(ge=8, le=MAX_SIDE)
    height: int = Field(ge=8, le=MAX_SIDE)
    model: str | None = None
    seed_base: int = DEFAULT_SEED  # -1: every segment asks the engine for a random seed
    fps: int = Field(DEFAULT_FPS, ge=1, le=120)
    chain_segments: bool = True
    mode: str = Field("vace", pattern="^(vace|i2v)$")  # the original's model_type
    overlap_mode: str = Field("shared", pattern="^(shared|context)$")
    continue_from_video: str | None = None
    continue_overlap: int = 0  # frames of continue_from_video that segment 0 starts from
    post: PostProcess = Field(default_factory=PostProcess)
    debug: bool = False
    skip_cleanup: bool = False
    segment_params_extra: dict[str, Any] = Field(default_factory=dict)
    ignored_params: dict[str, str] = Field(default_factory=dict)  # key -> why it was accepted but not used

    @property
    def num_segments(self) -> int:
        return len(self.segment_frames)

    @property
    def stitched(self) -> bool:
        """Whether the clips are cross-faded into one video: chained VACE runs only (the output rule)."""
        return self.mode == "vace" and self.chain_segments

    @property
    def generated_frames(self) -> list[int]:
        """Frames each segment generates: ``segment_frames``, plus the context frames in "context" mode."""
        frames = list(self.segment_frames)
        if self.stitched and self.overlap_mode == "context":
            for i in range(1, len(frames)):
                frames[i] = quantize_frames_down(frames[i] + self.overlaps[i - 1])
        return frames

    @property
    def timeline_frames(self) -> int:
        """Frames of the segments laid end to end with their overlaps shared (the structure guidance's
        timeline, and the stitched video's length)."""
        return sum(self.generated_frames) - sum(self.overlaps)

    @property
    def total_frames(self) -> int:
        """Frames of the output: the stitched new segments (a continued video's own frames come on top, see
        stitch), or, unstitched, the last segment's clip."""
        return self.timeline_frames if self.stitched else self.generated_frames[-1]


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a plan. ``anchors`` holds (frame index in the segment, index into plan.anchors)."""

    index: int
    frames: int
    overlap_in: int  # leading guide frames taken from the previous clip (or the continued video)
    overlap_out: int  # frames cross-faded with the next segment at stitch time
    anchors: tuple[tuple[int, int], ...]
    prompt: str
    negative_prompt: str
    seed: int
    start: int  # first frame of this clip in the stitched timeline (new segments only)
    end: int  # one past its last frame
    start_from_video: bool = False  # i2v: the start image is the continued video's last frame


def quantize_frames_down(frames: int) -> int:
    """The largest 4n+1 count not above ``frames`` (the original's rule for a segment with context frames)."""
    return (frames - 1) // 4 * 4 + 1


def segment_filename(run_id: str, index: int) -> str:
    return f"{run_id}_seg{index:02d}_output.mp4"


def final_filename(run_id: str) -> str:
    return f"{run_id}_final.mp4"


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _error(loc: tuple, message: str, value: Any) -> ValidationError:
    """A ValidationError whose loc names the field as the client spelled it."""
    return ValidationError.from_exception_data(
        "TravelPlan",
        [
            {
                "type": PydanticCustomError("travel_param", "{problem}", {"problem": message}),
                "loc": loc,
                "input": value,
            }
        ],
    )


# canonical name -> the keys each payload form may use for it (first found wins)
_ORIGINAL_KEYS: dict[str, tuple[str, ...]] = {
    "run_id": ("run_id",),
    "anchors": ("input_image_paths_resolved",),
    "num_segments": ("num_new_segments_to_generate",),
    "prompts": ("base_prompts_expanded",),
    "negative_prompts": ("negative_prompts_expanded",),
    "frames": ("segment_frames_expanded",),
    "overlaps": ("frame_overlap_expanded",),
    "continue_overlap": (),
    "resolution": ("parsed_resolution_wh",),
    "model": ("model_name",),
    "seed": ("seed_base",),
    "fps": ("fps_helpers",),
    "chain_segments": ("chain_segments",),
    "continue_from_video": ("continue_from_video_resolved_path",),
    "fade_in": ("fade_in_params_json_str",),
    "fade_out": ("fade_out_params_json_str",),
    "saturation": ("after_first_post_generation_saturation",),
    "brightness": ("after_first_post_generation_brightness",),
    "colour_match": ("colour_match_videos",),
    "upscale_factor": ("upscale_factor",),
    "crossfade_sharpness": ("crossfade_sharp_amt",),
    "show_input_images": ("show_input_images",),
    "debug": ("debug_mode_enabled",),
    "skip_cleanup": ("skip_cleanup_enabled",),
    "independent_segments": ("independent_segments",),
    "mode": ("model_type",),
    "overlap_mode": ("overlap_mode",),
}
_NATIVE_KEYS: dict[str, tuple[str, ...]] = {
    "run_id": ("run_id",),
    "anchors": ("images",),
    "num_segments": ("num_segments",),
    "prompts": ("prompts", "prompt"),
    "negative_prompts": ("negative_prompts", "negative_prompt"),
    "frames": ("frames",),
    "overlaps": ("overlap", "overlaps"),
    "continue_overlap": ("continue_overlap",),
    "resolution": ("resolution",),
    "model": ("model", "model_name"),
    "seed": ("seed", "seed_base"),
    "fps": ("fps",),
    "chain_segments": ("chain_segments",),
    "continue_from_video": ("continue_from_video",),
    "fade_in": ("fade_in",),
    "fade_out": ("fade_out",),
    "saturation": ("saturation",),
    "brightness": ("brightness",),
    "colour_match": ("colour_match",),
    "upscale_factor": ("upscale_factor",),
    "crossfade_sharpness": ("crossfade_sharpness",),
    "show_input_images": ("show_input_images",),
    "debug": ("debug",),
    "skip_cleanup": ("skip_cleanup",),
    "independent_segments": (),
    "mode": ("model_type",),
    "overlap_mode": ("overlap_mode",),
}
# Generation settings passed to every segment's VACE task (validated by the engine's BaseParams).
_EXTRA_KEYS = (
    "phase_config",
    "guidance2_scale",
    "guidance3_scale",
    "guidance_phases",
    "switch_threshold",
    "switch_threshold2",
    "model_switch_phase",
    "additional_loras",
    "activated_loras",
    "lora_names",
    "loras_multipliers",
    "lora_multipliers",
    "use_causvid_lora",
    "use_lighti2x_lora",
    "num_inference_steps",
    "guidance_scale",
    "flow_shift",
    "sample_solver",
    "control_net_weight",
    "control_net_weight2",
)


class _Fields:
    """Reads one payload's values by canonical name, remembering the loc to blame for each."""

    def __init__(self, data: dict, keys: dict[str, tuple[str, ...]], prefix: tuple) -> None:
        self.data, self.keys, self.prefix = data, keys, prefix

    def loc(self, name: str) -> tuple:
        keys = self.keys[name]
        for key in keys:
            if key in self.data:
                return (*self.prefix, key)
        return (*self.prefix, keys[0] if keys else name)

    def get(self, name: str, default: Any = None) -> Any:
        for key in self.keys[name]:
            if key in self.data and self.data[key] is not None:
                return self.data[key]
        return default

    def fail(self, name: str, message: str) -> ValidationError:
        return _error(self.loc(name), message, self.get(name))

    def integer(self, name: str, default: Any = None, minimum: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")
        return value

    def number(self, name: str) -> float | None:
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.fail(name, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise self.fail(name, f"must be a finite number, got {value!r}")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def text(self, name: str) -> str | None:
        value = self.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {type(value).__name__}")
        return value

    def per_segment(self, name: str, count: int, default: Any = None) -> list:
        """A single value or a list of ``count`` values -> a list of ``count`` values."""
        value = self.get(name, default)
        if value is None:
            raise self.fail(name, "is required")
        if not isinstance(value, list | tuple):
            return [value] * count
        if len(value) == 1:
            return list(value) * count
        if len(value) != count:
            raise self.fail(name, f"has {len(value)} values for {count} segments (give 1 or {count})")
        return list(value)


def _resolution(fields: _Fields) -> tuple[int, int]:
    value = fields.get("resolution")
    if value is None:
        raise fields.fail("resolution", "is required, as 'WIDTHxHEIGHT' like '512x288'")
    if isinstance(value, str):
        match = _RESOLUTION.match(value)
        if not match:
            raise fields.fail("resolution", f"must be 'WIDTHxHEIGHT' like '512x288', got {value!r}")
        value = (int(match.group(1)), int(match.group(2)))
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise fields.fail("resolution", f"must be 'WIDTHxHEIGHT' like '512x288', got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_SIDE for v in value):
        raise fields.fail(
            "resolution", f"width and height must be integers in [8, {MAX_SIDE}], got {value!r}"
        )
    return int(value[0]), int(value[1])


def _fade_frames(fields: _Fields, name: str, total: int) -> int:
    """A fade length in frames. Accepts an integer, or the original's JSON ({"duration_factor": f, ...}):
    there duration_factor is a fraction of the video, so the fade lasts round(f * total) frames."""
    value = fields.get(name)
    if value is None or value == "":
        return 0
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise fields.fail(name, f"must be a frame count or a JSON object, got {value!r}") from None
    if isinstance(value, dict):
        if "frames" in value:
            value = value["frames"]
        else:
            factor = value.get("duration_factor", 0.0)
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 <= factor <= 1:
                raise fields.fail(name, f"duration_factor must be a number in [0, 1], got {factor!r}")
            return round(factor * total)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fields.fail(name, f"must be a non-negative frame count, got {value!r}")
    return value


# Keys of the original's travel payload read elsewhere by the original and not needed here, with why.
_TRAVEL_IGNORED = {
    "steps": "the original's UI timeline steps, not denoising steps (the original ignores it for generation too)",
    "base_prompt": "the per-segment prompts are base_prompts_expanded",
    "main_output_dir_for_run": "bookkeeping of the original's worker (folders); outputs are stored per task",
    "orchestrator_task_id": "bookkeeping of the original's worker; the run is this task",
    "original_task_args": "bookkeeping of the original's worker",
    "original_common_settings": "bookkeeping of the original's worker",
    "upscale_model_name": "upscale_factor is 0 or 1: nothing to upscale",
}
_GUIDE_FADE = (
    "the original used it to fade anchors into the grey of its guide videos, and its current version "
    "hardcodes that off (duration_factor 0); it never faded the final video, so nothing is applied"
)
_CONSUMED = {
    "apply_causvid",
    "params_json_str_override",
    "orchestrator_details",
    *_EXTRA_KEYS,
    *STRUCTURE_KEYS,
}


def _unused_keys(data: dict, keys: dict[str, tuple[str, ...]], prefix: tuple) -> dict[str, str]:
    """Refuse the keys that would change the output but cannot be honoured; key -> why for the rest
    of the keys this plan does not read."""
    consumed = _CONSUMED | {key for names in keys.values() for key in names}
    ignored = {}
    for key, value in data.items():
        if key in consumed or value is None:  # null asks for nothing
            continue
        reason = refused_reason(key, value)
        if reason:
            raise _error((*prefix, key), reason, value)
        ignored[key] = _TRAVEL_IGNORED.get(key) or ignored_reason(key, value, "travel_orchestrator")
    return ignored


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _extras(data: dict, prefix: tuple, original: bool) -> dict[str, Any]:
    extras = {key: data[key] for key in _EXTRA_KEYS if data.get(key) is not None}
    if data.get("apply_causvid"):  # the original's name for the CausVid preset
        extras["use_causvid_lora"] = True
    override = data.get("params_json_str_override") if original else None
    if override:
        try:
            loaded = json.loads(override) if isinstance(override, str) else override
        except json.JSONDecodeError:
            raise _error((*prefix, "params_json_str_override"), "is not valid JSON", override) from None
        if not isinstance(loaded, dict):
            raise _error((*prefix, "params_json_str_override"), "must be a JSON object", override)
        if "steps" in loaded:  # the original's name for num_inference_steps
            extras["num_inference_steps"] = loaded["steps"]
        extras.update({k: v for k, v in loaded.items() if k in _EXTRA_KEYS})
    try:
        BaseParams.model_validate(extras)  # fail now, naming the key, rather than in every segment
    except ValidationError as error:
        first = error.errors()[0]
        loc = (*prefix, *first["loc"]) if first["loc"] else prefix
        raise _error(loc, first["msg"], first.get("input")) from None
    return extras


def parse_travel(params: dict, default_run_id: str | None = None) -> TravelPlan:
    """Validate a travel payload (the original ``orchestrator_details`` form or the native form).

    Raises pydantic.ValidationError whose loc names the offending key as the client spelled it. Without a
    ``run_id`` in the payload, ``default_run_id`` is used (pass the orchestrator task's id so a re-parse
    after a restart names the same files), else a random one.
    """
    if not isinstance(params, dict):
        raise _error(("params",), f"must be a JSON object, got {type(params).__name__}", params)
    if "orchestrator_details" in params:
        data = params["orchestrator_details"]
        if not isinstance(data, dict):
            raise _error(("orchestrator_details",), "must be a JSON object", data)
        fields, original = _Fields(data, _ORIGINAL_KEYS, ("orchestrator_details",)), True
    elif "input_image_paths_resolved" in params:  # the details given at top level
        data, original = params, True
        fields = _Fields(data, _ORIGINAL_KEYS, ())
    else:
        data, original = params, False
        fields = _Fields(data, _NATIVE_KEYS, ())

    run_id = fields.text("run_id") or default_run_id or f"travel_{uuid.uuid4().hex[:12]}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_id) or run_id.startswith("."):
        raise fields.fail("run_id", f"may hold only letters, digits, '.', '_' and '-', got {run_id!r}")

    continue_from = fields.text("continue_from_video")
    anchors = fields.get("anchors")
    if anchors is None:
        anchors = []
    if not isinstance(anchors, list | tuple) or not all(isinstance(a, str) and a for a in anchors):
        raise fields.fail("anchors", "must be a list of image paths or URLs")
    if not anchors:
        raise fields.fail("anchors", "needs at least 1 image")
    # N+1 images make N segments; one image alone makes one segment from it (no end image); with
    # continue_from_video every image ends a segment.
    count = len(anchors) if continue_from else max(len(anchors) - 1, 1)
    declared = fields.integer("num_segments", minimum=1)
    if declared is not None and declared != count:
        raise fields.fail(
            "num_segments", f"is {declared} but {len(anchors)} image(s) make {count} segment(s)"
        )

    prompts = fields.per_segment("prompts", count)
    if not all(isinstance(p, str) for p in prompts):
        raise fields.fail("prompts", "must be strings")
    negatives = fields.per_segment("negative_prompts", count, default="")
    if not all(isinstance(p, str) for p in negatives):
        raise fields.fail("negative_prompts", "must be strings")

    frames = []
    for i, value in enumerate(fields.per_segment("frames", count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _error((*fields.loc("frames"), i), f"must be a positive integer, got {value!r}", value)
        quantized = quantize_frames(value)
        if not MIN_SEGMENT_FRAMES <= quantized <= MAX_FRAMES:
            raise _error(
                (*fields.loc("frames"), i),
                f"{value} quantizes to {quantized} frames; allowed: {MIN_SEGMENT_FRAMES} to {MAX_FRAMES}",
                value,
            )
        frames.append(quantized)

    raw_overlaps = fields.get("overlaps", 0)
    if not isinstance(raw_overlaps, list | tuple):
        raw_overlaps = [raw_overlaps] * max(count, 1)
    for i, value in enumerate(raw_overlaps):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _error(
                (*fields.loc("overlaps"), i), f"must be a non-negative integer, got {value!r}", value
            )
    raw_overlaps = list(raw_overlaps)
    continue_overlap = 0
    if continue_from:
        explicit = fields.integer("continue_overlap", minimum=0)
        # The original reuses frame_overlap_expanded[0] for the continued video's boundary.
        continue_overlap = explicit if explicit is not None else (raw_overlaps[0] if raw_overlaps else 0)
        continue_overlap = min(continue_overlap, frames[0]) // 2 * 2
    boundaries = count - 1
    if len(raw_overlaps) == 1:
        raw_overlaps = raw_overlaps * boundaries
    elif len(raw_overlaps) == count and count > 1:
        raw_overlaps = raw_overlaps[:boundaries]  # original clients expand to N; the last one is unused
    if len(raw_overlaps) != boundaries and boundaries > 0:
        raise fields.fail(
            "overlaps", f"has {len(raw_overlaps)} values for {boundaries} boundaries (give 1 or {boundaries})"
        )
    # Cap at the shorter neighbour, then round down to even (the capped value may be odd: frames are 4n+1).
    overlaps = [min(raw_overlaps[i], frames[i], frames[i + 1]) // 2 * 2 for i in range(boundaries)]

    width, height = _resolution(fields)
    seed = fields.integer("seed", default=DEFAULT_SEED, minimum=-1)
    fps = fields.integer("fps", default=DEFAULT_FPS, minimum=1)
    if fps > 120:
        raise fields.fail("fps", f"must be <= 120, got {fps}")
    ignored = _unused_keys(data, fields.keys, fields.prefix)

    if fields.get("independent_segments") is not None and fields.get("chain_segments") is None:
        chain_segments = not fields.flag("independent_segments", False)  # the original's older name
    else:
        chain_segments = fields.flag("chain_segments", True)
    mode = fields.text("mode") or "vace"
    if mode not in TRAVEL_MODES:
        raise fields.fail("mode", f"must be one of {', '.join(TRAVEL_MODES)}, got {mode!r}")
    # The original's newest version always adds the overlap as context frames; our native form keeps the
    # frame counts its clients were built on (see the module docstring).
    overlap_mode = fields.text("overlap_mode") or ("context" if original else "shared")
    if overlap_mode not in OVERLAP_MODES:
        raise fields.fail("overlap_mode", f"must be one of {', '.join(OVERLAP_MODES)}, got {overlap_mode!r}")
    stitched = mode == "vace" and chain_segments
    if not stitched:
        why = "model_type i2v" if mode == "i2v" else "chain_segments false"
        unstitched = f"not used: with {why} the segments are separate clips, not stitched"
        if mode == "i2v" and fields.get("chain_segments") is True:
            ignored[fields.loc("chain_segments")[-1]] = (
                "the original chains only VACE segments: image-to-video segments are independent"
            )
        if any(raw_overlaps) and not (continue_from and mode == "vace"):  # else it starts segment 0
            ignored[fields.loc("overlaps")[-1]] = unstitched
        if mode == "i2v" and fields.get("continue_overlap") is not None:
            ignored[fields.loc("continue_overlap")[-1]] = "image-to-video starts from the video's last frame"
        for name in ("overlap_mode", "crossfade_sharpness"):
            if fields.get(name) is not None:
                ignored[fields.loc(name)[-1]] = unstitched
        if not original:  # the original form never fades nor upscales without a model (below)
            for name in ("fade_in", "fade_out", "upscale_factor"):
                if fields.get(name) not in (None, 0, 0.0, 1.0, ""):
                    raise fields.fail(
                        name, f"applies to the stitched video, and with {why} the segments are not stitched"
                    )
    if mode == "i2v":
        continue_overlap = 0  # image-to-video starts from the continued video's last frame only

    plan = TravelPlan(
        run_id=run_id,
        anchors=list(anchors),
        prompts=prompts,
        negative_prompts=negatives,
        segment_frames=frames,
        overlaps=overlaps,
        width=width,
        height=height,
        model=fields.text("model"),
        seed_base=seed,
        fps=fps,
        chain_segments=chain_segments,
        mode=mode,
        overlap_mode=overlap_mode,
        continue_from_video=continue_from,
        continue_overlap=continue_overlap,
        debug=fields.flag("debug", False),
        skip_cleanup=fields.flag("skip_cleanup", False),
        segment_params_extra=_extras(data, fields.prefix, original),
    )

    total = plan.total_frames
    fade_in = _fade_frames(fields, "fade_in", total)
    fade_out = _fade_frames(fields, "fade_out", total)
    if fade_in + fade_out > total:
        raise fields.fail("fade_in", f"fade_in {fade_in} + fade_out {fade_out} exceed the {total} frames")
    upscale_factor = fields.number("upscale_factor")
    if upscale_factor is not None and upscale_factor < 0:
        raise fields.fail("upscale_factor", f"must be >= 0, got {upscale_factor}")
    if upscale_factor in (0.0, 1.0):  # the original sends 0.0 for "no upscale"
        upscale_factor = None
    if original:
        # The original's fade params shaped its guide videos (anchors fading into grey), and its current
        # version hardcodes them off; they never faded the final video. Validated above, not applied.
        for name, frames_asked in (("fade_in", fade_in), ("fade_out", fade_out)):
            if frames_asked:
                ignored[fields.loc(name)[-1]] = _GUIDE_FADE
        fade_in = fade_out = 0
    if original and upscale_factor is not None:
        # The original upscales only with an upscale model (a generative video-to-video pass).
        if data.get("upscale_model_name"):
            raise _error(
                (*fields.prefix, "upscale_model_name"),
                "model-based upscaling (a video-to-video generation with that model) is not supported; "
                "leave upscale_model_name out",
                data["upscale_model_name"],
            )
        ignored["upscale_factor"] = "the original upscales only with an upscale_model_name; none given"
        upscale_factor = None

    post_values = {
        "colour_match": fields.flag("colour_match", False),
        "saturation": _default(fields.number("saturation"), 1.0),
        "brightness": _default(fields.number("brightness"), 0.0),
        "fade_in": fade_in,
        "fade_out": fade_out,
        "upscale_factor": upscale_factor,
        "crossfade_sharpness": fields.number("crossfade_sharpness") or 0.0,
        "show_input_images": fields.flag("show_input_images", False),
    }
    try:
        post = PostProcess(**post_values)
    except ValidationError as error:
        first = error.errors()[0]
        raise fields.fail(str(first["loc"][0]), first["msg"]) from None
    return plan.model_copy(update={"post": post, "ignored_params": ignored})


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------


def plan_segments(plan: TravelPlan) -> list[SegmentSpec]:
    """One SegmentSpec per segment, with its anchor placements and its place in the final timeline."""
    specs = []
    start = 0
    offset = 0 if plan.continue_from_video else 1  # end anchor of segment i is anchors[i + offset]
    for i, frames in enumerate(plan.generated_frames):
        end_anchor = i + offset
        start_anchor = end_anchor - 1
        if plan.mode == "i2v":
            overlap_in = 0  # image-to-video segments start from an image (the continued video's last frame)
        elif i == 0 and plan.continue_from_video:
            overlap_in = plan.continue_overlap
        elif plan.chain_segments and i > 0:
            overlap_in = plan.overlaps[i - 1]
        else:
            overlap_in = 0
        placements = []
        if overlap_in == 0 and start_anchor >= 0:
            placements.append((0, start_anchor))
        if end_anchor < len(plan.anchors):  # a single image has no end image: the model ends freely
            placements.append((frames - 1, end_anchor))
        overlap_out = plan.overlaps[i] if i < len(plan.overlaps) else 0
        seed = -1 if plan.seed_base < 0 else plan.seed_base + i
        specs.append(
            SegmentSpec(
                index=i,
                frames=frames,
                overlap_in=overlap_in,
                overlap_out=overlap_out,
                anchors=tuple(placements),
                prompt=plan.prompts[i],
                negative_prompt=plan.negative_prompts[i],
                seed=seed,
                start=start,
                end=start + frames,
                start_from_video=plan.mode == "i2v" and i == 0 and bool(plan.continue_from_video),
            )
        )
        start += frames - overlap_out
    return specs


def segment_guide(
    plan: TravelPlan,
    spec: SegmentSpec,
    previous_clip: np.ndarray | None,
    anchors: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The VACE guide (T, H, W, 3) and mask (T, H, W) of one segment (mask 255 = generate, 0 = keep).

    ``previous_clip`` is the previous segment's clip (or, for segment 0, the continued video's frames);
    its last ``spec.overlap_in`` frames lead the guide (resized to the plan's size with a centre crop if
    the engine returned another size). ``anchors`` are the decoded images of ``plan.anchors``.
    """
    if len(anchors) != len(plan.anchors):
        raise ValueError(f"anchors has {len(anchors)} images, the plan has {len(plan.anchors)}")
    leading = None
    if spec.overlap_in:
        if previous_clip is None:
            raise ValueError(
                f"previous_clip is required: segment {spec.index} starts from {spec.overlap_in} of its frames"
            )
        if not isinstance(previous_clip, np.ndarray) or previous_clip.ndim != 4:
            raise ValueError("previous_clip must be a (T, H, W, 3) uint8 array")
        if len(previous_clip) < spec.overlap_in:
            raise ValueError(
                f"previous_clip has {len(previous_clip)} frames, segment {spec.index} needs its last "
                f"{spec.overlap_in}"
            )
        leading = previous_clip[len(previous_clip) - spec.overlap_in :]
        if leading.shape[1:3] != (plan.height, plan.width):
            leading = fit_resolution(leading, plan.width, plan.height, "crop")
    placed = [(index, anchors[anchor]) for index, anchor in spec.anchors]
    return build_vace_guide(spec.frames, plan.width, plan.height, leading, placed)


def segment_params(plan: TravelPlan, spec: SegmentSpec, guide: np.ndarray, mask: np.ndarray) -> dict:
    """The ``vace`` task params of one segment, as the engine's VaceParams accepts them."""
    return _segment_task_params(plan, spec, video_guide=guide, video_mask=mask_to_video(mask))


def _segment_task_params(plan: TravelPlan, spec: SegmentSpec, **inputs: Any) -> dict[str, Any]:
    """What every segment generation gets (the run's extra keys, prompt, size, length, seed, fps, model),
    plus its conditioning `inputs`."""
    params: dict[str, Any] = {
        **plan.segment_params_extra,
        "prompt": spec.prompt,
        "resolution": f"{plan.width}x{plan.height}",
        "video_length": spec.frames,
        "seed": spec.seed,
        "fps": plan.fps,
        **inputs,
    }
    if spec.negative_prompt:
        params["negative_prompt"] = spec.negative_prompt
    if plan.model:
        params["model"] = plan.model
    return params


def step_task_type(plan: TravelPlan) -> str:
    """The generation task type of the run's segments: ``vace``, or for model_type i2v first/last-frame
    image-to-video (``flf2v``), or plain image-to-video (``i2v``) for a single image without an end."""
    if plan.mode == "vace":
        return "vace"
    return "flf2v" if len(plan.anchors) > 1 or plan.continue_from_video else "i2v"


def image_segment_task(
    plan: TravelPlan, spec: SegmentSpec, start_image: np.ndarray, end_image: np.ndarray | None
) -> tuple[str, dict[str, Any]]:
    """(task type, params) of an image-to-video segment: ``flf2v`` from its start to its end image, or
    ``i2v`` from its start image alone (a single image journey)."""
    ends = (
        {"image_start": start_image}
        if end_image is None
        else {"image_start": start_image, "image_end": end_image}
    )
    return ("flf2v" if end_image is not None else "i2v"), _segment_task_params(plan, spec, **ends)


def plan_summary(plan: TravelPlan) -> list[str]:
    """Human-readable lines of the expected frame counts, for debug logs (expected vs actual per step)."""
    lines = [
        f"travel {plan.run_id}: {plan.num_segments} segments, frames {plan.segment_frames}, overlaps "
        f"{plan.overlaps}, expected final {plan.total_frames} frames at {plan.width}x{plan.height}, "
        f"{plan.mode}, {'chained' if plan.chain_segments else 'independent'}, "
        f"{'stitched (' + plan.overlap_mode + ' overlaps)' if plan.stitched else 'unstitched'}"
    ]
    for spec in plan_segments(plan):
        lines.append(
            f"segment {spec.index}: {spec.frames} frames (timeline {spec.start}-{spec.end - 1}), "
            f"{spec.overlap_in} leading frames kept, anchors {list(spec.anchors)}, seed {spec.seed}"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------
# Stitching
# ---------------------------------------------------------------------------------------------------------


def colour_reference(
    plan: TravelPlan, anchors: list[np.ndarray], index: int, continued: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) reference images of segment ``index``'s colour match, as the original picks them: the
    segment's start and end anchors (a single image is both); with a continued video, segment 0 starts
    from its last frame (``continued`` may be just that frame, (1, H, W, 3))."""
    if len(anchors) != len(plan.anchors):
        raise ValueError(f"anchors has {len(anchors)} images, the plan has {len(plan.anchors)}")
    if plan.continue_from_video:
        if index == 0 and continued is None:
            raise ValueError("continued is required to colour match the first segment of a continued run")
        start = continued[-1] if index == 0 else anchors[index - 1]
        return start, anchors[index]
    return anchors[index], anchors[min(index + 1, len(anchors) - 1)]


def adjust_clip(
    plan: TravelPlan,
    index: int,
    clip: np.ndarray,
    references: tuple[np.ndarray, np.ndarray] | None,
    continued: bool = False,
) -> np.ndarray:
    """One clip's post-processing, in the original's order: saturation and brightness
    (``after_first_post_generation_*``: every clip after the first, and every clip of a continued run),
    then colour matching toward its (start, end) ``references`` when colour_match is on."""
    post = plan.post
    if index > 0 or continued:
        clip = adjust_brightness(adjust_saturation(clip, post.saturation), post.brightness)
    if post.colour_match and references is not None:
        clip = colour_match(clip, *references)
    return clip


@dataclass(frozen=True)
class StitchPiece:
    """Frames ``[start, end)`` of a stitched run's video, final as soon as the clips it needs are made.

    Pieces start where clips start on the stitched timeline, so a clip's cross-fade into the next belongs
    to the next clip's piece, and the piece of clip i needs only clip i and the clips whose frames reach
    into it (its predecessor when they overlap). The continued video goes with segment 0's piece (every
    piece has a clip to take its size from); a piece too short to join alone goes with the next one. The
    run encodes each piece while the chain generates the next segments, and joins them at the end.
    """

    index: int
    start: int  # on the stitched timeline, before any upscale
    end: int
    total: int  # frames of the whole video (fades are placed on it)
    continued: bool  # whether the continued video's frames reach into it (it is then the first clip)
    segments: tuple[int, ...]  # the segments whose clips reach into it, in order
    overlaps: tuple[int, ...]  # the cross-fades between those clips (the continued video first)
    skip: int  # frames of the folded clips before ``start``

    @property
    def frames(self) -> int:
        return self.end - self.start


def stitch_pieces(plan: TravelPlan, continued_frames: int | None = None) -> list[StitchPiece]:
    """The pieces of ``plan``'s stitched video, in order; ``continued_frames``: the decoded
    continue_from_video's length (it comes first, cross-faded over ``plan.continue_overlap`` frames)."""
    if not plan.stitched:
        raise ValueError(f"travel {plan.run_id} is not stitched: its segments are separate clips")
    lengths: list[int] = list(plan.generated_frames)
    overlaps: list[int] = list(plan.overlaps)
    names: list[int | None] = list(range(plan.num_segments))  # None: the continued video
    if continued_frames is not None:
        lengths.insert(0, continued_frames)
        overlaps.insert(0, min(plan.continue_overlap, continued_frames))
        names.insert(0, None)
    starts = [0]
    for length, overlap in zip(lengths, overlaps, strict=False):
        starts.append(starts[-1] + length - overlap)
    ends = [start + length for start, length in zip(starts, lengths, strict=True)]
    total = ends[-1]
    bounds = [0]
    for start in starts[names.index(0) + 1 :]:
        if start - bounds[-1] >= MIN_JOIN_FRAMES and total - start >= MIN_JOIN_FRAMES:
            bounds.append(start)
    bounds.append(total)
    pieces = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        # The clips reaching into [start, end) (clip ends never decrease along the timeline).
        first = next(j for j, clip_end in enumerate(ends) if clip_end > start)
        last = max(j for j, clip_start in enumerate(starts) if clip_start < end)
        pieces.append(
            StitchPiece(
                index=len(pieces), start=start, end=end, total=total,
                continued=names[first] is None,
                segments=tuple(n for n in names[first : last + 1] if n is not None),
                overlaps=tuple(overlaps[first:last]), skip=start - starts[first],
            )
        )  # fmt: skip
    return pieces


def stitch_piece(
    plan: TravelPlan,
    piece: StitchPiece,
    clips: Sequence[np.ndarray],
    anchors: list[np.ndarray] | None,
    continued: np.ndarray | None = None,
) -> np.ndarray:
    """The final frames of ``piece``: its clips (those of ``piece.segments``, in order) post-processed,
    cross-faded, faded and upscaled exactly as in the whole video (see :func:`stitch_segments`)."""
    if len(clips) != len(piece.segments):
        raise ValueError(f"piece {piece.index} needs the clips of segments {list(piece.segments)}")
    generated = plan.generated_frames
    for index, clip in zip(piece.segments, clips, strict=True):
        if not isinstance(clip, np.ndarray) or clip.ndim != 4:
            raise ValueError(f"clips[{index}] must be a (T, H, W, 3) uint8 array")
        if len(clip) != generated[index]:
            raise ValueError(f"clips[{index}] has {len(clip)} frames, the plan expects {generated[index]}")
    if plan.continue_from_video and continued is None:
        raise ValueError("continued is required: the run continues a video")
    if continued is not None and (not isinstance(continued, np.ndarray) or continued.ndim != 4):
        raise ValueError("continued must be a (T, H, W, 3) uint8 array")
    post = plan.post
    if post.colour_match and anchors is None:
        raise ValueError("anchors are required when colour_match is on")
    adjusted = [
        adjust_clip(
            plan, index, clip,
            colour_reference(plan, anchors, index, continued) if post.colour_match else None,
            continued is not None,
        )
        for index, clip in zip(piece.segments, clips, strict=True)
    ]  # fmt: skip
    if piece.continued:  # every piece has a clip: the continued video takes the clips' size
        height, width = adjusted[0].shape[1:3]
        if continued.shape[1:3] != (height, width):
            continued = fit_resolution(continued, width, height, "crop")
        adjusted.insert(0, continued)
    video = stitch(adjusted, list(piece.overlaps), sharpness=post.crossfade_sharpness)
    video = video[piece.skip : piece.skip + piece.frames]
    if post.fade_in or post.fade_out:
        video = fade(video, post.fade_in, post.fade_out, start=piece.start, total=piece.total)
    if post.upscale_factor:
        video = upscale(video, post.upscale_factor)
    return video


def stitch_segments(
    plan: TravelPlan,
    clips: list[np.ndarray],
    anchors: list[np.ndarray] | None,
    continued: np.ndarray | None = None,
) -> np.ndarray:
    """Post-process each clip, cross-fade them into the final video, then fade and upscale: the
    :func:`stitch_pieces` of the run made one after the other (a run makes them as its segments come).

    Per clip, in the original's order: saturation and brightness (``after_first_post_generation_*``: every
    clip after the first; with a continued video every new clip, the continued video being the first),
    then colour matching (every clip, toward its start and end references, see :func:`colour_reference`).
    Adjusting before the cross-fade makes each overlap blend from one look into the next instead of
    jumping. ``anchors`` are the decoded images of ``plan.anchors`` (needed only for colour matching).
    ``continued`` (the decoded continue_from_video) is prepended with ``plan.continue_overlap`` frames of
    cross-fade and left unadjusted. Returns uint8 (T, H, W, 3) frames: plan.total_frames of them, plus
    len(continued) - plan.continue_overlap with a continued video.
    """
    if len(clips) != plan.num_segments:
        raise ValueError(f"clips has {len(clips)} clips, the plan has {plan.num_segments} segments")
    pieces = stitch_pieces(plan, None if continued is None else len(continued))
    return np.concatenate(
        [stitch_piece(plan, p, [clips[i] for i in p.segments], anchors, continued) for p in pieces]
    )


def validate(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check a payload at the API (pydantic.ValidationError names the field); returns its input references."""
    plan = parse_travel(params)
    refs: list[tuple[str, Any]] = [("anchors", list(plan.anchors))]
    if plan.continue_from_video:
        refs.append(("continue_from_video", plan.continue_from_video))
    refs.extend(structure_references(travel_structure(params, plan)))
    return refs


def travel_structure(params: dict[str, Any], plan: TravelPlan | None = None) -> StructureGuidance | None:
    """The structure guidance of a travel payload (``structure_video_path`` / ``structure_videos`` /
    ``structure_guidance`` ... in its ``orchestrator_details`` or at the top level), applied as the VACE
    control video of every segment; errors name the key where the client put it. With the payload's
    ``plan``, guidance on a model_type i2v run is refused (naming model_type)."""
    details = params.get("orchestrator_details")
    data, prefix = (details, ("orchestrator_details",)) if isinstance(details, dict) else (params, ())
    try:
        guidance = parse_structure_guidance(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise _error((*prefix, *first["loc"]), first["msg"], first.get("input")) from None
    if guidance is not None and plan is not None and plan.mode == "i2v":
        raise _error(
            (*prefix, "model_type"),
            "structure guidance is a VACE control video: it needs model_type 'vace', not 'i2v'",
            plan.mode,
        )
    return guidance


def structure_references(guidance: StructureGuidance | None) -> list[tuple[str, Any]]:
    """The structure videos of a guidance as input references (field, path or URL)."""
    if guidance is None:
        return []
    refs: list[tuple[str, Any]] = [
        (f"structure_videos[{i}].path", v.path) for i, v in enumerate(guidance.videos)
    ]
    if guidance.precomputed_video:
        refs.append(("structure_guidance_video_url", guidance.precomputed_video))
    return refs
