"""``individual_travel_segment``: regenerate one segment of a travel run on its own, without Ray.

The original runs it through its travel-segment handler in "standalone" mode: the run's
``orchestrator_details`` (or ``full_orchestrator_payload``) come with the task, values are looked up
individual_segment_params > the task's own params > orchestrator_details, no predecessor is waited for
(the segment starts from its start image, not from the previous clip) and the raw generation is the output
(no chaining, colour matching or saturation afterwards).

    segment_index             default 0
    individual_segment_params start_image_url / end_image_url, input_image_paths_resolved [start, end],
                              num_frames, base_prompt, negative_prompt, seed_to_use, additional_loras
    task params               num_frames / segment_frames_target, base_prompt, negative_prompt,
                              seed_to_use (default 12345, not seed_base + index), model_name,
                              parsed_resolution_wh, input_image_paths_resolved, additional_loras
    orchestrator_details      everything else, as for travel_orchestrator (model_type "vace" or "i2v")

Here the output is named like the segment of the run (``{run_id}_seg{NN}_output.mp4``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from dag.travel_plan import (
    SegmentSpec,
    TravelPlan,
    image_segment_task,
    parse_travel,
    plan_segments,
    segment_filename,
    segment_params,
    structure_references,
)
from Wan2GP.field_errors import field_error
from Wan2GP.params import MAX_FRAMES, quantize_frames
from Wan2GP.structure import StructureGuidance, parse_structure_guidance
from Wan2GP.video import build_vace_guide

DEFAULT_SEGMENT_SEED = 12345  # the original's seed_to_use default
TRAVEL_MODES = ("vace", "i2v")


@dataclass(frozen=True)
class IndividualSegmentPlan:
    plan: TravelPlan  # the run, as parsed from orchestrator_details (with the task's overrides)
    spec: SegmentSpec  # this segment, with the resolved frames, prompts and seed
    mode: str  # "vace": a VACE guide with both anchors; "i2v": first/last-frame image-to-video
    start_image: str | None  # path or URL; None when the segment starts from the continued video
    end_image: str | None  # None: a single image journey (the run has one image), no end image
    start_from_continued_video: bool  # take the start image from the last frame of continue_from_video
    structure: StructureGuidance | None
    filename: str


def _first(key: str, *sources: dict[str, Any]) -> Any:
    for source in sources:
        value = source.get(key)
        if value not in (None, "", [], {}):
            return value
    return None


def plan_individual_segment(
    params: dict[str, Any], default_run_id: str | None = None
) -> IndividualSegmentPlan:
    """Validate an ``individual_travel_segment`` task and resolve its one segment."""
    if not isinstance(params, dict):
        raise field_error(("params",), "must be a JSON object", params)
    details_key = "orchestrator_details" if "orchestrator_details" in params else "full_orchestrator_payload"
    details = params.get(details_key)
    if not isinstance(details, dict):
        raise field_error(
            ("orchestrator_details",), "is required: the travel run's orchestrator_details", details
        )
    individual = params.get("individual_segment_params") or {}
    if not isinstance(individual, dict):
        raise field_error(("individual_segment_params",), "must be a JSON object", individual)
    for source, prefix in ((params, ()), (details, (details_key,))):
        if source.get("use_svi"):
            raise field_error(
                (*prefix, "use_svi"), "SVI continuation is not available here", source["use_svi"]
            )
    mode = details.get("model_type", "vace") or "vace"
    if mode not in TRAVEL_MODES:
        raise field_error(
            (details_key, "model_type"), f"must be one of {', '.join(TRAVEL_MODES)}, got {mode!r}", mode
        )

    overridden = dict(details)
    for key in ("model_name", "parsed_resolution_wh"):  # the task's own value wins over the run's
        if params.get(key):
            overridden[key] = params[key]
    try:
        plan = parse_travel({"orchestrator_details": overridden}, default_run_id=default_run_id)
    except ValidationError as error:  # blame the key the client sent (a task-level override, or its payload)
        first = error.errors()[0]
        key = first["loc"][1] if len(first["loc"]) > 1 else None
        if key in ("model_name", "parsed_resolution_wh") and params.get(key):
            loc: tuple = (key,)
        else:
            loc = (details_key, *first["loc"][1:])
        raise field_error(loc, first["msg"], first.get("input")) from None

    index = params.get("segment_index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < plan.num_segments:
        raise field_error(
            ("segment_index",),
            f"must be an integer in [0, {plan.num_segments - 1}] for this run, got {index!r}",
            index,
        )
    spec = plan_segments(plan)[index]

    frames_key = next(
        (k for k, s in (("num_frames", individual), ("num_frames", params), ("segment_frames_target", params))
         if s.get(k) not in (None, "")),
        None,
    )  # fmt: skip
    frames = plan.segment_frames[index]  # as asked: a standalone segment has no context frames
    if frames_key is not None:
        raw = (
            individual.get(frames_key) if individual.get(frames_key) not in (None, "") else params[frames_key]
        )
        loc = (
            ("individual_segment_params", frames_key)
            if individual.get(frames_key) not in (None, "")
            else (frames_key,)
        )
        if isinstance(raw, bool) or not isinstance(raw, int) or not 5 <= quantize_frames(raw) <= MAX_FRAMES:
            raise field_error(
                loc, f"must be an integer giving 5 to {MAX_FRAMES} frames after 4n+1, got {raw!r}", raw
            )
        frames = quantize_frames(raw)

    prompt = _first("base_prompt", individual, params)
    negative = _first("negative_prompt", individual, params)
    seed = _first("seed_to_use", individual, params)
    if seed is None:
        seed = DEFAULT_SEGMENT_SEED
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < -1:
        raise field_error(("seed_to_use",), f"must be an integer >= -1, got {seed!r}", seed)
    spec = replace(
        spec,
        frames=frames,
        overlap_in=0,  # standalone: no predecessor clip
        anchors=(),  # this segment's images are resolved below, not taken from plan.anchors
        prompt=prompt if isinstance(prompt, str) else spec.prompt,
        negative_prompt=negative if isinstance(negative, str) else spec.negative_prompt,
        seed=seed,
        end=spec.start + frames,
    )

    start_image, end_image, from_video = _segment_images(params, individual, plan, index)
    loras = _first("additional_loras", individual, params)
    if loras is not None:
        plan = plan.model_copy(
            update={"segment_params_extra": {**plan.segment_params_extra, "additional_loras": loras}}
        )
    return IndividualSegmentPlan(
        plan=plan,
        spec=spec,
        mode=mode,
        start_image=start_image,
        end_image=end_image,
        start_from_continued_video=from_video,
        structure=parse_structure_guidance({**details, **params}),
        filename=segment_filename(plan.run_id, index),
    )


def _segment_images(
    params: dict[str, Any], individual: dict[str, Any], plan: TravelPlan, index: int
) -> tuple[str | None, str | None, bool]:
    """(start image, end image, start from the continued video's last frame), the original's precedence;
    a run of one image has no end image."""
    if individual.get("start_image_url") or individual.get("end_image_url"):
        start, end = individual.get("start_image_url"), individual.get("end_image_url")
        if not (isinstance(start, str) and start and isinstance(end, str) and end):
            raise field_error(
                ("individual_segment_params", "end_image_url" if start else "start_image_url"),
                "is required with the other one (both images of the segment)",
            )
        return start, end, False
    for images, loc in (
        (
            individual.get("input_image_paths_resolved"),
            ("individual_segment_params", "input_image_paths_resolved"),
        ),
        (params.get("input_image_paths_resolved"), ("input_image_paths_resolved",)),
    ):
        if images:
            if (
                not isinstance(images, list)
                or len(images) < 2
                or not all(isinstance(i, str) and i for i in images[:2])
            ):
                raise field_error(loc, "must list the segment's [start image, end image]", images)
            return images[0], images[1], False
    if plan.continue_from_video:
        if index == 0:
            return None, plan.anchors[0], True
        return plan.anchors[index - 1], plan.anchors[index], False
    end = plan.anchors[index + 1] if index + 1 < len(plan.anchors) else None
    return plan.anchors[index], end, False


def individual_segment_task(
    segment: IndividualSegmentPlan, start_image: np.ndarray, end_image: np.ndarray | None
) -> tuple[str, dict[str, Any]]:
    """(task type, params) of the segment's generation, given its decoded start and end images.

    vace: a guide holding the start image on frame 0 and the end image (if any) on the last frame (the rest
    generated), with the run's generation settings; i2v: first/last-frame image-to-video ("flf2v" here),
    or plain image-to-video ("i2v") without an end image.
    """
    plan, spec = segment.plan, segment.spec
    if segment.mode == "i2v":
        return image_segment_task(plan, spec, start_image, end_image)
    placed = [(0, start_image)] + ([(-1, end_image)] if end_image is not None else [])
    guide, mask = build_vace_guide(spec.frames, plan.width, plan.height, None, placed)
    return "vace", segment_params(plan, spec, guide, mask)


def validate_individual_segment(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Check an ``individual_travel_segment`` payload; returns its input references."""
    segment = plan_individual_segment(params, default_run_id="check")
    if segment.structure is not None and segment.mode == "i2v":
        raise field_error(
            ("orchestrator_details", "model_type"),
            "structure guidance is a VACE control video: it needs model_type 'vace', not 'i2v'",
            segment.mode,
        )
    refs: list[tuple[str, Any]] = [("end_image", segment.end_image)] if segment.end_image else []
    if segment.start_image is not None:
        refs.insert(0, ("start_image", segment.start_image))
    if segment.start_from_continued_video:
        refs.append(("continue_from_video", segment.plan.continue_from_video))
    refs.extend(structure_references(segment.structure))
    return refs
