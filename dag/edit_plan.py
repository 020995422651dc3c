"""Video editing without Ray: ``inpaint_frames`` and ``edit_video_orchestrator`` plans.

``inpaint_frames`` regenerates frames [inpaint_start_frame, inpaint_end_frame) of one video with VACE:
``context_frame_count`` frames on each side are kept (the original requires that many on both sides), the
range is generated, and the generation is spliced back (cross-faded over the context), so the result has
the video's own length. The original returned only the generated context + range + context clip; the
splice is what "regenerate a range of frames within a video" means, and the clip is kept as an
intermediate. The range keeps its exact length: to reach VACE's 4n+1 frames the context grows (when the
video has frames to spare) or shrinks, never the range.

``edit_video_orchestrator`` (the original's contract): ``portions_to_regenerate`` [{start_frame,
end_frame (inclusive), prompt?, gap_frame_count?}] of ``source_video_url`` are cut out; the remaining
"keeper" clips are joined again with the clip-joining chain (``dag/join_plan.py``, INSERT mode), one join
per portion, whose gap of ``gap_frame_count`` generated frames (default 53, per portion overridable) takes
the portion's place. With ``replace_mode`` each portion's first and last frames stay as anchors in the
keepers and only the frames between them are regenerated.

``video_guide_outpainting`` and ``mask_expand`` are VACE generation settings in the original (Wan2GP reads
them while preparing the control video): they live in ``Wan2GP/control.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dag.join_plan import (
    BridgeSpec,
    ClipRef,
    Generate,
    JoinResult,
    JoinRunPlan,
    JoinSettings,
    bridge_guide,
    bridge_params,
    generation_extras,
    ignored_keys,
    join_child_payloads,
    per_join_settings,
    quantize_total,
    splice_bridge,
    validate_model,
)
from Wan2GP.field_errors import field_error
from Wan2GP.params import MAX_FRAMES, parse_resolution

MAX_PORTIONS = 32
PAYLOAD_FRAME_TOLERANCE = 3  # the original trusts the client's frame count when within 3 of the probe


# ---------------------------------------------------------------------------------------------------------
# inpaint_frames
# ---------------------------------------------------------------------------------------------------------


class InpaintParams(BaseModel):
    """``inpaint_frames`` params (the original's names and defaults)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    video_path: str = Field(min_length=1)
    inpaint_start_frame: int = Field(ge=0)
    inpaint_end_frame: int = Field(ge=1)
    context_frame_count: int = Field(8, ge=1, le=MAX_FRAMES)
    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    seed: int = Field(-1, ge=-1)
    fps: float | None = Field(None, gt=0, le=120)  # default: the video's own rate
    resolution: tuple[int, int] | None = None

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> tuple[int, int] | None:
        return parse_resolution(value)

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        return "" if value is None else value


def parse_inpaint(params: dict[str, Any]) -> tuple[InpaintParams, dict[str, Any]]:
    """Validate an ``inpaint_frames`` task: (its params, generation extras for the VACE task)."""
    if not isinstance(params, dict):
        raise field_error(("params",), "must be a JSON object", params)
    inpaint = validate_model(InpaintParams, params)
    if inpaint.inpaint_end_frame <= inpaint.inpaint_start_frame:
        raise field_error(
            ("inpaint_end_frame",),
            f"must be greater than inpaint_start_frame ({inpaint.inpaint_start_frame}); the range is [start, end)",
            inpaint.inpaint_end_frame,
        )
    return inpaint, generation_extras(params)


def plan_inpaint(total_frames: int, params: InpaintParams) -> BridgeSpec:
    """The frame plan of regenerating [start, end) of a ``total_frames`` video, as a bridge between the
    video before the range (clip A) and after it (clip B): splice_bridge then returns total_frames frames.

    The original's range check: the range lies inside the video with ``context_frame_count`` frames on
    each side. The generation is context + range + context quantized to 4n+1 by adding context frames
    (after the range first) when the video has them, else by removing them (after the range first).
    """
    start, end, context = params.inpaint_start_frame, params.inpaint_end_frame, params.context_frame_count
    if end > total_frames:
        raise field_error(("inpaint_end_frame",), f"{end} exceeds the video's {total_frames} frames", end)
    if start < context:
        raise field_error(
            ("inpaint_start_frame",),
            f"needs {context} context frames before it (context_frame_count) but only {start} exist",
            start,
        )
    if total_frames - end < context:
        raise field_error(
            ("inpaint_end_frame",),
            f"needs {context} context frames after it (context_frame_count) but only {total_frames - end} exist",
            end,
        )
    gap = end - start
    if gap + 2 * context > MAX_FRAMES:
        raise field_error(
            ("inpaint_end_frame",),
            f"range of {gap} frames plus 2 x {context} context frames exceeds {MAX_FRAMES} generated frames",
            end,
        )
    before = after = context
    requested = before + gap + after
    missing = (4 - (requested - 1) % 4) % 4  # frames to add to reach the next 4n+1
    spare_after, spare_before = total_frames - end - after, start - before
    if missing and spare_after + spare_before >= missing:
        extra_after = min(missing, spare_after)
        after += extra_after
        before += missing - extra_after
    else:
        surplus = requested - quantize_total(requested)
        cut_after = min(surplus, after - 1)
        after -= cut_after
        before -= surplus - cut_after
    if (before + gap + after - 1) % 4:
        raise field_error(
            ("context_frame_count",), f"cannot reach 4n+1 frames around the {gap}-frame range", context
        )
    return BridgeSpec(
        context_before=before,
        gap=gap,
        context_after=after,
        requested_gap=gap,
        quantization_shift=0,
        replace_mode=False,
        gap_from_a=0,
        gap_from_b=0,
        len_a=start,
        len_b=total_frames - end,
    )


def inpaint_clips(video: np.ndarray, params: InpaintParams) -> tuple[np.ndarray, np.ndarray]:
    """(clip A, clip B): the video before and after the range, for bridge_guide / splice_bridge."""
    return video[: params.inpaint_start_frame], video[params.inpaint_end_frame :]


def inpaint_filename(task_id: str) -> str:
    return f"{task_id}_inpainted.mp4"


# ---------------------------------------------------------------------------------------------------------
# edit_video_orchestrator
# ---------------------------------------------------------------------------------------------------------


class Portion(BaseModel):
    """A portion to regenerate: frames start_frame..end_frame inclusive (the original's convention)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    start_frame: int = Field(ge=0)
    end_frame: int = Field(ge=0)
    prompt: str | None = None
    gap_frame_count: int | None = Field(None, ge=0, le=MAX_FRAMES)


@dataclass(frozen=True)
class EditRunPlan:
    """A validated edit run, before the source video is probed."""

    run_id: str
    source_video_url: str
    source_fps: float
    declared_total_frames: int | None
    portions: tuple[Portion, ...]  # sorted by start_frame
    replace_mode: bool
    joins: tuple[JoinSettings, ...]  # joins[i] regenerates portions[i]
    generation: dict[str, Any]
    ignored: tuple[str, ...]


def parse_edit_video_orchestrator(params: dict[str, Any], default_run_id: str | None = None) -> EditRunPlan:
    """Validate an ``edit_video_orchestrator`` task (``params.orchestrator_details``)."""
    details = params.get("orchestrator_details") if isinstance(params, dict) else None
    if not isinstance(details, dict):
        raise field_error(("orchestrator_details",), "is required: a JSON object", details)
    prefix = ("orchestrator_details",)
    run_id = details.get("run_id") or default_run_id
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", run_id) or run_id.startswith("."):
        raise field_error((*prefix, "run_id"), "is required: letters, digits, '.', '_' and '-' only", run_id)
    source = details.get("source_video_url")
    if not isinstance(source, str) or not source:
        raise field_error((*prefix, "source_video_url"), "is required (the video to edit)", source)
    fps = details.get("source_video_fps", 16)
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps <= 120:
        raise field_error(
            (*prefix, "source_video_fps"), f"must be a frame rate in (0, 120], got {fps!r}", fps
        )
    declared = details.get("source_video_total_frames")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
        raise field_error(
            (*prefix, "source_video_total_frames"), f"must be a positive integer, got {declared!r}"
        )

    raw = details.get("portions_to_regenerate")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PORTIONS:
        raise field_error((*prefix, "portions_to_regenerate"), f"must list 1 to {MAX_PORTIONS} portions", raw)
    portions = []
    for i, portion in enumerate(raw):
        if not isinstance(portion, dict):
            raise field_error(
                (*prefix, "portions_to_regenerate", i), "must be {start_frame, end_frame, ...}", portion
            )
        checked = validate_model(Portion, portion, (*prefix, "portions_to_regenerate", i))
        if checked.end_frame < checked.start_frame:
            raise field_error(
                (*prefix, "portions_to_regenerate", i, "end_frame"),
                f"must be >= start_frame {checked.start_frame} (end_frame is inclusive)",
                checked.end_frame,
            )
        portions.append(checked)
    order = sorted(range(len(portions)), key=lambda i: portions[i].start_frame)
    for a, b in zip(order, order[1:], strict=False):
        if portions[a].end_frame >= portions[b].start_frame:
            raise field_error(
                (*prefix, "portions_to_regenerate", b, "start_frame"),
                f"portion {b} (frames {portions[b].start_frame}-{portions[b].end_frame}) overlaps portion {a} "
                f"(frames {portions[a].start_frame}-{portions[a].end_frame})",
            )
    portions = [portions[i] for i in order]

    per_join = details.get("per_join_settings") or []
    if not isinstance(per_join, list) or not all(isinstance(s, dict) for s in per_join):
        raise field_error((*prefix, "per_join_settings"), "must be a list of objects", per_join)
    overrides = []
    for i, portion in enumerate(portions):  # a portion's own prompt and gap win over per_join_settings
        override = dict(per_join[i]) if i < len(per_join) else {}
        if portion.prompt is not None:
            override["prompt"] = portion.prompt
        if portion.gap_frame_count is not None:
            override["gap_frame_count"] = portion.gap_frame_count
        overrides.append(override)
    base = {"prompt": "smooth transition", **details}
    # replace_mode decides how keepers are cut; the keepers themselves are joined by INSERT
    joins = per_join_settings(base, overrides, len(portions), prefix, forced={"replace_mode": False})
    return EditRunPlan(
        run_id=run_id,
        source_video_url=source,
        source_fps=float(fps),
        declared_total_frames=declared,
        portions=tuple(portions),
        replace_mode=bool(details.get("replace_mode", False)),
        joins=tuple(joins),
        generation=generation_extras(details, prefix),
        ignored=tuple(ignored_keys(details)),
    )


def source_frame_count(plan: EditRunPlan, probed_frames: int) -> int:
    """The frame count the portions refer to: the client's when within 3 of the probed video's (the
    original trusts it then), else the probed one."""
    declared = plan.declared_total_frames
    if declared is not None and abs(declared - probed_frames) <= PAYLOAD_FRAME_TOLERANCE:
        return declared
    return probed_frames


def keeper_segments(plan: EditRunPlan, total_frames: int) -> list[tuple[int, int]]:
    """The kept clips as inclusive (first, last) frame ranges, in order. Between two keepers lies one
    portion; with replace_mode a portion's first and last frames stay in the keepers as anchors."""
    if plan.portions[-1].end_frame >= total_frames:
        raise field_error(
            ("orchestrator_details", "portions_to_regenerate"),
            f"portion frames {plan.portions[-1].start_frame}-{plan.portions[-1].end_frame} reach past the "
            f"video's {total_frames} frames",
        )
    keepers = []
    edge = 0 if plan.replace_mode else 1
    first_end = plan.portions[0].start_frame - edge
    if first_end >= 0:
        keepers.append((0, first_end))
    for previous, following in zip(plan.portions, plan.portions[1:], strict=False):
        start, end = previous.end_frame + edge, following.start_frame - edge
        if end >= start:
            keepers.append((start, end))
    last_start = plan.portions[-1].end_frame + edge
    if last_start < total_frames:
        keepers.append((last_start, total_frames - 1))
    if len(keepers) != len(plan.portions) + 1:
        raise field_error(
            ("orchestrator_details", "portions_to_regenerate"),
            f"every portion needs kept frames on both sides (got {len(keepers)} kept clips for "
            f"{len(plan.portions)} portions): a portion may not touch the video's first or last frame or "
            "another portion",
        )
    return keepers


def keeper_clip_name(index: int) -> str:
    return f"keeper_{index}.mp4"


def edit_join_payloads(
    plan: EditRunPlan, keeper_urls: list[str], orchestrator_task_id: str, project_id: str | None = None
) -> list[dict]:
    """The chained ``join_clips_segment`` rows of an edit run, given where the keeper clips were stored."""
    if len(keeper_urls) != len(plan.joins) + 1:
        raise ValueError(f"{len(keeper_urls)} keeper clips for {len(plan.joins)} joins")
    clips = tuple(ClipRef(url=url, name=f"keeper_{i}") for i, url in enumerate(keeper_urls))
    run = JoinRunPlan(
        run_id=plan.run_id,
        clips=clips,
        joins=plan.joins,
        generation=plan.generation,
        loop_first_clip=False,
        ignored=plan.ignored,
    )
    return join_child_payloads(run, orchestrator_task_id, project_id)


def run_inpaint(
    video: np.ndarray, video_fps: float, params: InpaintParams, generation: dict[str, Any], generate: Generate
) -> JoinResult:
    """Regenerate the range of a decoded video: plan, guide, generate (VACE), splice. The result keeps the
    video's length; ``fps`` (default the video's) only sets the rate the generation and output run at."""
    spec = plan_inpaint(len(video), params)
    before, after = inpaint_clips(video, params)
    if params.resolution is not None:
        width, height = params.resolution
    else:
        height, width = video.shape[1:3]
    fps = params.fps or video_fps
    guide, mask = bridge_guide(before, after, spec, width, height)
    settings = JoinSettings(prompt=params.prompt, negative_prompt=params.negative_prompt, model=params.model,
                            seed=params.seed)  # fmt: skip
    generated = generate("vace", bridge_params(spec, settings, guide, mask, fps, generation))
    if len(generated) != spec.total:
        raise RuntimeError(
            f"the inpaint generation returned {len(generated)} frames, {spec.total} were requested"
        )
    return JoinResult(
        frames=splice_bridge(before, after, generated, spec), fps=fps, spec=spec, bridge=generated
    )


def validate_inpaint(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check an ``inpaint_frames`` payload; returns its input references."""
    inpaint, _ = parse_inpaint(params)
    return [("video_path", inpaint.video_path)]


def validate_edit_video(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check an ``edit_video_orchestrator`` payload; returns its input references."""
    plan = parse_edit_video_orchestrator(params, default_run_id="check")
    return [("orchestrator_details.source_video_url", plan.source_video_url)]
