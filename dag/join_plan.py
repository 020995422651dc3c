"""Joining clips with a generated VACE bridge, without Ray: params, the bridge plan, its guide and the splice.

The original's ``join_clips_segment`` (its ``join_clips`` handler) joins clip A and clip B like this:

1. ``context_frame_count`` frames at the end of A and at the start of B are kept as context, and
   ``gap_frame_count`` grey frames between them are generated: one VACE generation of
   context + gap + context frames (mask: context kept, gap generated).
2. VACE needs 4n+1 frames, so the total is quantized down (``(total - 1) // 4 * 4 + 1``) and the gap
   loses the difference (the context stays whole).
3. INSERT mode (default): A and B are kept whole; REPLACE mode (``replace_mode``): the gap replaces
   frames at the boundary instead, half taken from the end of A and the rest from the start of B (shifted
   to the other clip when one is too short), and the context sits just outside the removed frames.
4. The joined video is trimmed A, the bridge, trimmed B, each junction cross-faded over the context
   frames (which the bridge re-generates), so it has len(A) + len(B) + gap frames in INSERT mode and
   len(A) + len(B) in REPLACE mode.

``keep_bridging_images`` keeps A's last and B's first context frame inside the gap (at a third and two
thirds of it), so the bridge passes through them. ``join_clips_orchestrator`` chains one join per pair of
consecutive clips: join i joins the output of join i-1 with clip i+1.

Differences from the original, on purpose: when REPLACE mode shortens a side's context, the cross-fade at
that junction uses that side's context length (the original blends ``context_frame_count`` frames there,
which misaligns the blend); a sum that cannot be quantized by shortening the gap is refused instead of
producing a guide longer than the generation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from Wan2GP.field_errors import field_error
from Wan2GP.params import MAX_FRAMES, BaseParams, parse_resolution
from Wan2GP.video import MASK_GENERATE, MASK_KEEP, fit_resolution, mask_to_video, stitch

DEFAULT_FPS = 16
JOIN_CROSSFADE_SHARPNESS = 0.3  # the original joins with linear_sharp, sharp_amt 0.3
MAX_CLIPS = 64
GREY = 128  # the original's gap frames are RGB (128, 128, 128)
_ASPECT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")

# Generation settings forwarded to the bridge's VACE task (validated by the engine's BaseParams).
GENERATION_KEYS = (
    "num_inference_steps",
    "guidance_scale",
    "flow_shift",
    "sample_solver",
    "additional_loras",
    "activated_loras",
    "lora_names",
    "loras_multipliers",
    "lora_multipliers",
    "use_causvid_lora",
    "use_lighti2x_lora",
)
# Keys the original reads that nothing here honours: reported in the task result as ignored.
IGNORED_KEYS = (
    "vid2vid_init_strength",
    "phase_config",
    "enhance_prompt",
    "vlm_device",
    "audio_url",
    "priority",
)


def quantize_total(frames: int) -> int:
    """VACE's frame count for a request of ``frames``: the largest 4n+1 not above it."""
    return (frames - 1) // 4 * 4 + 1


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


class JoinSettings(BaseModel):
    """The settings of one join (the original's join settings, with its defaults)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    context_frame_count: int = Field(8, ge=1, le=MAX_FRAMES)
    gap_frame_count: int = Field(53, ge=0, le=MAX_FRAMES)
    replace_mode: bool = False
    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    aspect_ratio: tuple[float, float] | None = None
    resolution: tuple[int, int] | None = None
    use_input_video_resolution: bool = False
    fps: int | None = Field(None, ge=1, le=120)
    use_input_video_fps: bool = False
    seed: int = Field(-1, ge=-1)
    keep_bridging_images: bool = False
    max_wait_time: float | None = Field(None, gt=0, le=86400)

    @field_validator("aspect_ratio", mode="before")
    @classmethod
    def _aspect(cls, value: Any) -> tuple[float, float] | None:
        if value in (None, ""):
            return None
        match = _ASPECT.match(value) if isinstance(value, str) else None
        if not match or float(match.group(1)) <= 0 or float(match.group(2)) <= 0:
            raise ValueError(f"must be 'W:H' like '16:9', got {value!r}")
        return float(match.group(1)), float(match.group(2))

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> tuple[int, int] | None:
        return parse_resolution(value)

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        return "" if value is None else value


class JoinSegmentParams(JoinSettings):
    """``join_clips_segment``: join two videos (the original's handler module is named join_clips; the
    task type it serves is join_clips_segment, and our cross-fade ``join_clips`` keeps its own meaning)."""

    starting_video_path: str | None = None  # None: a chained join takes its predecessor's output
    ending_video_path: str = Field(min_length=1)
    orchestrator_task_id_ref: str | None = None
    orchestrator_run_id: str | None = None
    join_index: int = Field(0, ge=0)
    is_first_join: bool = False
    is_last_join: bool = False


def generation_extras(data: dict[str, Any], prefix: tuple = ()) -> dict[str, Any]:
    """The generation settings of ``data`` forwarded to the VACE task, checked now by the engine's model."""
    extras = {key: data[key] for key in GENERATION_KEYS if data.get(key) not in (None, {}, [])}
    try:
        BaseParams.model_validate(extras)  # fail now, naming the key, not in the generation step
    except ValidationError as error:
        first = error.errors()[0]
        raise field_error((*prefix, *first["loc"]), first["msg"], first.get("input")) from None
    return extras


def ignored_keys(data: dict[str, Any]) -> list[str]:
    """The keys of ``data`` the original honours and this service does not (for the task result)."""
    return [key for key in IGNORED_KEYS if data.get(key) not in (None, False, "", {}, [])]


def validate_model(model: type[BaseModel], data: dict[str, Any], prefix: tuple = ()) -> Any:
    """``model.model_validate(data)`` whose first error is re-raised with ``prefix`` before its loc."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise field_error((*prefix, *first["loc"]), first["msg"], first.get("input")) from None


def parse_join_segment(params: dict[str, Any]) -> tuple[JoinSegmentParams, dict[str, Any]]:
    """Validate a ``join_clips_segment`` task: (its settings, generation extras for the bridge)."""
    if not isinstance(params, dict):
        raise field_error(("params",), "must be a JSON object", params)
    segment = validate_model(JoinSegmentParams, params)
    if not segment.starting_video_path and not segment.orchestrator_task_id_ref:
        raise field_error(("starting_video_path",), "is required (a standalone join needs both videos)")
    if not segment.starting_video_path and segment.is_first_join:
        raise field_error(("starting_video_path",), "is required for the first join of a run")
    return segment, generation_extras(params)


@dataclass(frozen=True)
class ClipRef:
    url: str
    name: str


@dataclass(frozen=True)
class JoinRunPlan:
    """A validated ``join_clips_orchestrator`` run: the clips and the settings of each join."""

    run_id: str
    clips: tuple[ClipRef, ...]
    joins: tuple[JoinSettings, ...]  # joins[i] joins (the result so far) with clips[i + 1]
    generation: dict[str, Any]
    loop_first_clip: bool  # clips[1] is clips[0] played backwards (made by the orchestrator step)
    ignored: tuple[str, ...]


def parse_join_orchestrator(params: dict[str, Any], default_run_id: str | None = None) -> JoinRunPlan:
    """Validate a ``join_clips_orchestrator`` task (``params.orchestrator_details``)."""
    details = params.get("orchestrator_details") if isinstance(params, dict) else None
    if not isinstance(details, dict):
        raise field_error(
            ("orchestrator_details",), "is required: a JSON object with clip_list and run_id", details
        )
    prefix = ("orchestrator_details",)
    run_id = details.get("run_id") or default_run_id
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", run_id) or run_id.startswith("."):
        raise field_error((*prefix, "run_id"), "is required: letters, digits, '.', '_' and '-' only", run_id)
    raw_clips = details.get("clip_list")
    if not isinstance(raw_clips, list):
        raise field_error((*prefix, "clip_list"), "must be a list of {url, name?}", raw_clips)
    clips = []
    for i, clip in enumerate(raw_clips):
        if not isinstance(clip, dict) or not isinstance(clip.get("url"), str) or not clip["url"]:
            raise field_error(
                (*prefix, "clip_list", i, "url"), "is required (the clip's video URL or path)", clip
            )
        name = clip.get("name") or f"clip_{i}"
        clips.append(ClipRef(url=clip["url"], name=re.sub(r"[^A-Za-z0-9._-]", "_", str(name))))
    loop_first = bool(details.get("loop_first_clip", False))
    if loop_first:
        if not clips:
            raise field_error((*prefix, "clip_list"), "needs at least 1 clip with loop_first_clip")
        clips = [clips[0], ClipRef(url=clips[0].url, name=f"{clips[0].name}_reversed")]
    if not 2 <= len(clips) <= MAX_CLIPS:
        raise field_error(
            (*prefix, "clip_list"), f"needs 2 to {MAX_CLIPS} clips, got {len(clips)}", raw_clips
        )

    base = {"prompt": "smooth transition", **details}  # the orchestrator's default prompt
    joins = per_join_settings(base, details.get("per_join_settings"), len(clips) - 1, prefix)
    return JoinRunPlan(
        run_id=run_id,
        clips=tuple(clips),
        joins=tuple(joins),
        generation=generation_extras(details, prefix),
        loop_first_clip=loop_first,
        ignored=tuple(ignored_keys(details)),
    )


def per_join_settings(
    base: dict[str, Any], per_join: Any, count: int, prefix: tuple, forced: dict[str, Any] | None = None
) -> list[JoinSettings]:
    """The settings of ``count`` joins: ``base`` (the run's keys) with ``per_join[i]`` on top, then
    ``forced``. An error in the run's keys names the run's key, one in an override names
    per_join_settings[i]."""
    per_join = per_join or []
    if not isinstance(per_join, list) or not all(isinstance(s, dict) for s in per_join):
        raise field_error((*prefix, "per_join_settings"), "must be a list of objects", per_join)
    forced = forced or {}
    validate_model(JoinSettings, {**base, **forced}, prefix)
    return [
        validate_model(
            JoinSettings,
            {**base, **(per_join[i] if i < len(per_join) else {}), **forced},
            (*prefix, "per_join_settings", i),
        )
        for i in range(count)
    ]


def join_child_payloads(
    plan: JoinRunPlan, orchestrator_task_id: str, project_id: str | None = None
) -> list[dict]:
    """The params of the ``join_clips_segment`` rows of a run, in order; row i depends on row i-1
    (``dependant_on``) and, except the first, takes its starting video from that predecessor's output."""
    payloads = []
    for i, settings in enumerate(plan.joins):
        values = settings.model_dump(exclude_none=True)
        if settings.aspect_ratio is not None:
            values["aspect_ratio"] = f"{settings.aspect_ratio[0]:g}:{settings.aspect_ratio[1]:g}"
        if settings.resolution is not None:
            values["resolution"] = list(settings.resolution)
        payloads.append(
            {
                **values,
                **plan.generation,
                "orchestrator_task_id_ref": orchestrator_task_id,
                "orchestrator_run_id": plan.run_id,
                "project_id": project_id,
                "join_index": i,
                "is_first_join": i == 0,
                "is_last_join": i == len(plan.joins) - 1,
                "starting_video_path": plan.clips[0].url if i == 0 else None,
                "ending_video_path": plan.clips[i + 1].url,
            }
        )
    return payloads


def joined_filename(task_id: str) -> str:
    """The original's name of a join's output."""
    return f"{task_id}_joined.mp4"


# ---------------------------------------------------------------------------------------------------------
# The bridge
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeSpec:
    """Frame arithmetic of one join. The bridge is [context_before | gap | context_after]."""

    context_before: int
    gap: int  # generated frames (the requested gap minus quantization_shift)
    context_after: int
    requested_gap: int
    quantization_shift: int
    replace_mode: bool
    gap_from_a: int  # frames removed from the end of A (REPLACE mode)
    gap_from_b: int  # frames removed from the start of B (REPLACE mode)
    len_a: int
    len_b: int
    anchors: tuple[tuple[int, str], ...] = ()  # (index in the gap, "a" | "b") kept bridging images

    @property
    def total(self) -> int:
        """Frames of the bridge generation (4n+1)."""
        return self.context_before + self.gap + self.context_after

    @property
    def joined_frames(self) -> int:
        """Frames of the joined video."""
        kept_a = self.len_a - self.gap_from_a
        kept_b = self.len_b - self.gap_from_b
        return kept_a + self.total + kept_b - self.context_before - self.context_after


def plan_bridge(len_a: int, len_b: int, settings: JoinSettings) -> BridgeSpec:
    """The frame plan of joining a clip of ``len_a`` frames with one of ``len_b`` (after fps resampling)."""
    context, gap = settings.context_frame_count, settings.gap_frame_count
    context_before = context_after = context
    gap_from_a = gap_from_b = 0
    if settings.replace_mode:
        # The original's order: quantize the symmetric request, split the gap between the clips, shorten a
        # side's context when its clip is too short, then quantize again with the actual contexts.
        gap = _quantized_gap(context, gap, context)
        gap_from_a, gap_from_b = _split_gap(gap, len_a, len_b)
        context_before = min(context, len_a - gap_from_a)
        context_after = min(context, len_b - gap_from_b)
        gap = _quantized_gap(context_before, settings.gap_frame_count, context_after)
        gap_from_a, gap_from_b = _split_gap(gap, len_a, len_b)
        if context_before > len_a - gap_from_a or context_after > len_b - gap_from_b:
            raise field_error(
                ("gap_frame_count",),
                f"videos too short for replace_mode: {gap} frames replaced plus {context_before} + "
                f"{context_after} context frames do not fit in {len_a} + {len_b} frames",
            )
    else:
        for length, name in ((len_a, "starting"), (len_b, "ending")):
            if length < context:
                raise field_error(
                    ("context_frame_count",),
                    f"{context} context frames needed but the {name} video has only {length}",
                    context,
                )
        gap = _quantized_gap(context, gap, context)
    if context_before + gap + context_after > MAX_FRAMES:
        raise field_error(
            ("gap_frame_count",),
            f"the bridge would have {context_before + gap + context_after} frames; at most {MAX_FRAMES} "
            "(2 x context_frame_count + gap_frame_count)",
            settings.gap_frame_count,
        )
    anchors: tuple[tuple[int, str], ...] = ()
    if settings.keep_bridging_images and gap >= 3 and gap // 3 < gap * 2 // 3:
        anchors = ((gap // 3, "a"), (gap * 2 // 3, "b"))
    return BridgeSpec(
        context_before=context_before,
        gap=gap,
        context_after=context_after,
        requested_gap=settings.gap_frame_count,
        quantization_shift=settings.gap_frame_count - gap,
        replace_mode=settings.replace_mode,
        gap_from_a=gap_from_a,
        gap_from_b=gap_from_b,
        len_a=len_a,
        len_b=len_b,
        anchors=anchors,
    )


def _quantized_gap(context_before: int, gap: int, context_after: int) -> int:
    """The gap once the bridge is quantized to 4n+1 frames: the context stays whole, the gap gives way."""
    requested = context_before + gap + context_after
    quantized_gap = gap - (requested - quantize_total(requested))
    if quantized_gap < 0:
        raise field_error(
            ("gap_frame_count",),
            f"context {context_before} + gap {gap} + context {context_after} = {requested} frames must come "
            f"down to 4n+1 by shortening the gap, but the gap has only {gap}: use a larger gap_frame_count "
            "or a sum of the form 4n+1",
            gap,
        )
    return quantized_gap


def _split_gap(gap: int, len_a: int, len_b: int) -> tuple[int, int]:
    """REPLACE mode: frames removed from the end of A and the start of B (half each, A's half rounded
    down; a clip too short to keep one frame passes the rest to the other)."""
    if gap > (len_a - 1) + (len_b - 1):
        raise field_error(
            ("gap_frame_count",),
            f"videos too short for the gap: {gap} frames to replace but only {len_a - 1 + len_b - 1} available "
            f"(starting video {len_a} frames, ending video {len_b}; each keeps at least one)",
            gap,
        )
    from_a = gap // 2
    from_b = gap - from_a
    if len_a < from_a + 1:
        from_b += from_a - (len_a - 1)
        from_a = len_a - 1
    if len_b < from_b + 1:
        from_a += from_b - (len_b - 1)
        from_b = len_b - 1
    return from_a, from_b


def _fit(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    return frames if frames.shape[1:3] == (height, width) else fit_resolution(frames, width, height, "crop")


def bridge_guide(
    clip_a: np.ndarray, clip_b: np.ndarray, spec: BridgeSpec, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """The VACE guide (T, H, W, 3) and mask (T, H, W) of the bridge (mask 255 = generate, 0 = keep)."""
    _check_lengths(clip_a, clip_b, spec)
    end_a = len(clip_a) - spec.gap_from_a
    before = _fit(clip_a[end_a - spec.context_before : end_a], width, height)
    after = _fit(clip_b[spec.gap_from_b : spec.gap_from_b + spec.context_after], width, height)
    guide = np.full((spec.total, height, width, 3), GREY, dtype=np.uint8)
    mask = np.full((spec.total, height, width), MASK_GENERATE, dtype=np.uint8)
    guide[: spec.context_before] = before
    mask[: spec.context_before] = MASK_KEEP
    guide[spec.context_before + spec.gap :] = after
    mask[spec.context_before + spec.gap :] = MASK_KEEP
    for index, side in spec.anchors:
        guide[spec.context_before + index] = before[-1] if side == "a" else after[0]
        mask[spec.context_before + index] = MASK_KEEP
    return guide, mask


def splice_bridge(
    clip_a: np.ndarray,
    clip_b: np.ndarray,
    bridge: np.ndarray,
    spec: BridgeSpec,
    sharpness: float = JOIN_CROSSFADE_SHARPNESS,
) -> np.ndarray:
    """The joined video: A (less its replaced end), the bridge, B (less its replaced start), cross-fading
    each junction over its context frames. All frames take the bridge's size. Has spec.joined_frames frames."""
    _check_lengths(clip_a, clip_b, spec)
    if len(bridge) != spec.total:
        raise ValueError(f"the bridge has {len(bridge)} frames, the plan expects {spec.total}")
    height, width = bridge.shape[1:3]
    kept_a = _fit(clip_a[: len(clip_a) - spec.gap_from_a], width, height)
    kept_b = _fit(clip_b[spec.gap_from_b :], width, height)
    return stitch([kept_a, bridge, kept_b], [spec.context_before, spec.context_after], sharpness=sharpness)


def _check_lengths(clip_a: np.ndarray, clip_b: np.ndarray, spec: BridgeSpec) -> None:
    if (len(clip_a), len(clip_b)) != (spec.len_a, spec.len_b):
        raise ValueError(
            f"clips have {len(clip_a)} and {len(clip_b)} frames, the plan was made for {spec.len_a} and {spec.len_b}"
        )


# ---------------------------------------------------------------------------------------------------------
# Preparing the clips
# ---------------------------------------------------------------------------------------------------------


def resample_fps(frames: np.ndarray, source_fps: float, target_fps: float) -> np.ndarray:
    """Frames at ``target_fps``: output frame k shows the source frame nearest its time (ffmpeg's fps
    filter); rates within 0.01 of each other leave the frames as they are."""
    if abs(source_fps - target_fps) <= 0.01:
        return frames
    count = max(1, round(len(frames) * target_fps / source_fps))
    indices = np.minimum(np.round(np.arange(count) * source_fps / target_fps).astype(int), len(frames) - 1)
    return frames[indices]


def crop_to_aspect(frames: np.ndarray, aspect: tuple[float, float]) -> np.ndarray:
    """Centre-crop frames to the aspect ratio W:H (the original's aspect_ratio standardisation)."""
    height, width = frames.shape[1:3]
    target = aspect[0] / aspect[1]
    if abs(width / height - target) < 0.01:
        return frames
    if width / height > target:
        new_width = max(1, int(height * target))
        left = (width - new_width) // 2
        return frames[:, :, left : left + new_width]
    new_height = max(1, int(width / target))
    top = (height - new_height) // 2
    return frames[:, top : top + new_height]


@dataclass(frozen=True)
class PreparedClips:
    clip_a: np.ndarray
    clip_b: np.ndarray
    fps: float
    width: int
    height: int


def prepare_clips(
    clip_a: np.ndarray, fps_a: float, clip_b: np.ndarray, fps_b: float, settings: JoinSettings
) -> PreparedClips:
    """Bring both clips to the join's frame rate and aspect ratio and choose the bridge resolution, as the
    original does: fps (default 16) unless use_input_video_fps (then A's rate); resolution from the
    settings unless use_input_video_resolution or none is given (then A's size after cropping)."""
    fps = fps_a if settings.use_input_video_fps else float(settings.fps or DEFAULT_FPS)
    a = resample_fps(clip_a, fps_a, fps)
    b = resample_fps(clip_b, fps_b, fps)
    if settings.aspect_ratio is not None:
        a, b = crop_to_aspect(a, settings.aspect_ratio), crop_to_aspect(b, settings.aspect_ratio)
    if settings.resolution is not None and not settings.use_input_video_resolution:
        width, height = settings.resolution
    else:
        height, width = a.shape[1:3]
    return PreparedClips(clip_a=a, clip_b=b, fps=fps, width=int(width), height=int(height))


def bridge_params(
    spec: BridgeSpec,
    settings: JoinSettings,
    guide: np.ndarray,
    mask: np.ndarray,
    fps: float,
    generation: dict[str, Any],
) -> dict[str, Any]:
    """The ``vace`` task params of the bridge generation (as the engine's VaceParams accepts them)."""
    params: dict[str, Any] = {
        **generation,
        "prompt": settings.prompt,
        "resolution": f"{guide.shape[2]}x{guide.shape[1]}",
        "video_length": spec.total,
        "seed": settings.seed,
        "fps": round(fps),
        "video_guide": guide,
        "video_mask": mask_to_video(mask),
        "video_prompt_type": "VM",
    }
    if settings.negative_prompt:
        params["negative_prompt"] = settings.negative_prompt
    if settings.model:
        params["model"] = settings.model
    return params


# ---------------------------------------------------------------------------------------------------------
# One join, start to end
# ---------------------------------------------------------------------------------------------------------

Generate = Callable[[str, dict[str, Any]], np.ndarray]  # (task type, params) -> uint8 (T, H, W, 3) frames


@dataclass(frozen=True)
class JoinResult:
    frames: np.ndarray
    fps: float
    spec: BridgeSpec
    bridge: np.ndarray  # the generated bridge (an intermediate worth keeping in debug mode)


def run_join(
    clip_a: np.ndarray,
    fps_a: float,
    clip_b: np.ndarray,
    fps_b: float,
    settings: JoinSettings,
    generation: dict[str, Any],
    generate: Generate,
) -> JoinResult:
    """Join two decoded clips: prepare them, plan and build the bridge guide, generate it with ``generate``
    (a VACE task), check its length and splice it. The steps a join_clips_segment deployment runs."""
    prepared = prepare_clips(clip_a, fps_a, clip_b, fps_b, settings)
    spec = plan_bridge(len(prepared.clip_a), len(prepared.clip_b), settings)
    guide, mask = bridge_guide(prepared.clip_a, prepared.clip_b, spec, prepared.width, prepared.height)
    bridge = generate("vace", bridge_params(spec, settings, guide, mask, prepared.fps, generation))
    if len(bridge) != spec.total:
        raise RuntimeError(
            f"the bridge generation returned {len(bridge)} frames, {spec.total} were requested"
        )
    frames = splice_bridge(prepared.clip_a, prepared.clip_b, bridge, spec)
    return JoinResult(frames=frames, fps=prepared.fps, spec=spec, bridge=bridge)


# ---------------------------------------------------------------------------------------------------------
# The registry's checks (at POST and at claim): input references of a valid payload
# ---------------------------------------------------------------------------------------------------------


def validate_join_segment(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check a ``join_clips_segment`` payload; returns its input references (a chained join's start is its
    predecessor's output, found when it runs)."""
    segment, _ = parse_join_segment(params)
    refs: list[tuple[str, Any]] = [("ending_video_path", segment.ending_video_path)]
    if segment.starting_video_path:
        refs.insert(0, ("starting_video_path", segment.starting_video_path))
    return refs


def validate_join_orchestrator(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check a ``join_clips_orchestrator`` payload; returns its clips as input references."""
    plan = parse_join_orchestrator(params, default_run_id="check")
    urls = list(dict.fromkeys(clip.url for clip in plan.clips))  # loop_first_clip repeats clip 0
    return [("orchestrator_details.clip_list", urls)]
