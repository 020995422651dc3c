"""Work limits: how much one task may ask for (Ray-free, HTTP-free).

Each value of a task is capped by its params model (resolution, frames, steps, ...), but not their
product: 4096x4096 pixels x 1025 frames x 200 steps passes every field check and would hold a GPU for
days. Routing calls these checks when a task is posted and again when it is claimed (rows written
straight into the table were never posted); they raise `InvalidTask` naming the fields to lower.

    work = width x height x frames x denoising steps      (a travel: summed over its segments)
           + output width x height x frames               (a generation's output post-processing, when asked:
                                                           Wan2GP.postprocess; its output size and frames are
                                                           also held to max_output_pixels / max_output_frames)

The default budget admits the largest real model's normal jobs (1280x720, 81 frames, 50 steps) four
times over; the list caps keep a payload from naming thousands of anchors, references, clips or LoRAs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import InvalidTask
from storage import InputError
from Wan2GP.catalog import ModelDefinition
from Wan2GP.params import MAX_SIDE, BaseParams
from Wan2GP.postprocess import PostProcess
from Wan2GP.video import probe_video

LARGEST_NORMAL_JOB = 1280 * 720 * 81 * 50
# Params nested deeper than this are refused: no payload needs it, and serializers give up on deep ones.
MAX_NESTING = 32
IMAGE_FAMILIES = ("flux", "flux_kontext")


class LimitSettings(BaseModel):
    """`limits:` of the app config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_work: int = Field(
        default=4 * LARGEST_NORMAL_JOB, gt=0, description="width x height x frames x steps of one task"
    )
    max_list_items: int = Field(
        default=64, ge=1, description="items of any list in params (anchors, image_refs, clips, prompts, ...)"
    )
    max_loras: int = Field(default=16, ge=0, description="LoRAs one task may ask for")
    max_output_frames: int = Field(default=4097, ge=1, description="frames of a travel's final video")
    max_output_pixels: int = Field(
        default=3840 * 2160, ge=64, description="width x height of an output after upscaling"
    )
    max_decoded_frames: int = Field(default=4097, ge=1, description="frames of one input video")
    max_decoded_pixels: int = Field(
        default=1025 * 1280 * 720,
        ge=1,
        description="frames x width x height of one input video (x3 bytes once decoded)",
    )


def _lists(value: Any, path: str, depth: int = 0) -> list[tuple[str, int]]:
    """(path, length) of every list inside `value` (params are JSON: dicts, lists, scalars)."""
    if depth > MAX_NESTING:
        raise InvalidTask(path, f"is nested more than {MAX_NESTING} levels deep")
    found: list[tuple[str, int]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _lists(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        found.append((path, len(value)))
        for i, item in enumerate(value[:256]):  # a longer list is refused anyway
            found += _lists(item, f"{path}[{i}]", depth + 1)
    return found


def check_lists(params: dict[str, Any], limits: LimitSettings) -> None:
    """Every list in params within `max_list_items`; LoRA names within `max_loras` (before any parsing)."""
    for path, length in _lists(params, "params"):
        if length > limits.max_list_items:
            raise InvalidTask(
                path, f"has {length} items; the limit is {limits.max_list_items} (limits.max_list_items)"
            )
    names = params.get("activated_loras", params.get("lora_names"))
    count = len(names.split(",")) if isinstance(names, str) else len(names) if isinstance(names, list) else 0
    extra = params.get("additional_loras")
    count += len(extra) if isinstance(extra, dict | list) else 0
    if count > limits.max_loras:
        raise InvalidTask(
            "params.activated_loras",
            f"asks for {count} LoRAs; the limit is {limits.max_loras} (limits.max_loras)",
        )


def _over_budget(work: int, parts: str, fields: str, limits: LimitSettings) -> InvalidTask:
    return InvalidTask(
        "params",
        f"{parts} = {work:,} units of work, over the limit of {limits.max_work:,} (limits.max_work); "
        f"lower {fields}",
    )


def check_generation(
    parsed: BaseParams, model: ModelDefinition, task_type: str, limits: LimitSettings
) -> None:
    """One generation's pixels x frames x steps within the budget (model defaults fill what params omit)."""
    defaults = model.defaults
    width, height = parsed.resolution or (defaults.width, defaults.height)
    steps = parsed.num_inference_steps or defaults.num_inference_steps
    if task_type == "single_image":
        frames = 1
    elif model.family in IMAGE_FAMILIES:
        frames = getattr(parsed, "video_length", None) or 1  # Flux: the number of images
    else:
        frames = getattr(parsed, "video_length", None) or defaults.frames
    work = width * height * frames * steps
    post = parsed.postprocess() if isinstance(parsed, BaseParams) else PostProcess()
    if post.active:  # the CPU post-processing: counted as one more step over the (bigger) output
        out_width, out_height = post.output_size(width, height)
        out_frames = post.output_frames(frames)
        work += out_width * out_height * out_frames
        _check_output(post, out_width, out_height, out_frames, limits)
    if work > limits.max_work:
        parts = f"resolution {width}x{height} x {frames} frames x {steps} steps"
        if post.active:
            parts += f" + post-processed output {out_width}x{out_height} x {out_frames} frames"
        raise _over_budget(work, parts, "resolution, video_length or num_inference_steps", limits)


def _check_output(post: PostProcess, width: int, height: int, frames: int, limits: LimitSettings) -> None:
    """A post-processed output's size and frames within the output limits (`Wan2GP.postprocess`)."""
    if post.spatial_upsampling and (
        max(width, height) > MAX_SIDE or width * height > limits.max_output_pixels
    ):
        raise InvalidTask(
            "params.spatial_upsampling",
            f"{post.spatial_upsampling!r} gives {width}x{height} = {width * height:,} pixels per frame; the limit "
            f"is {limits.max_output_pixels:,} (limits.max_output_pixels) and {MAX_SIDE} a side",
        )
    if frames > limits.max_output_frames:
        raise InvalidTask(
            "params.temporal_upsampling",
            f"{post.temporal_upsampling!r} gives {frames} frames; the limit is {limits.max_output_frames} "
            "(limits.max_output_frames)",
        )


def check_travel(plan: Any, steps: int, limits: LimitSettings) -> None:
    """A travel plan (`dag.travel_plan.TravelPlan`): segments' work, final frames and upscaled size."""
    frames = sum(plan.generated_frames)  # with context overlaps, more than segment_frames
    work = plan.width * plan.height * frames * steps
    if work > limits.max_work:
        parts = f"resolution {plan.width}x{plan.height} x {frames} frames in {plan.num_segments} segments x {steps} steps"
        raise _over_budget(
            work, parts, "resolution, the segment frames, the number of images or the steps", limits
        )
    if plan.total_frames > limits.max_output_frames:
        raise InvalidTask(
            "params.frames",
            f"the final video would have {plan.total_frames} frames; the limit is {limits.max_output_frames} "
            "(limits.max_output_frames)",
        )
    factor = plan.post.upscale_factor or 1.0
    pixels = int(plan.width * factor) * int(plan.height * factor)
    if pixels > limits.max_output_pixels:
        raise InvalidTask(
            "params.upscale_factor",
            f"upscaling {plan.width}x{plan.height} by {factor:g} gives {pixels:,} pixels per frame; the limit is "
            f"{limits.max_output_pixels:,} (limits.max_output_pixels)",
        )


def check_decoded_video(path: Path, field: str, limits: LimitSettings) -> None:
    """An input video's frames and decoded size within the limits, read without decoding its pixels
    (blocking: runs ffmpeg). A small compressed file can decode to many gigabytes. Raises InputError."""
    try:
        info = probe_video(path)
    except ValueError:
        raise InputError(field, "is not a readable video") from None
    frames, width, height = info["frames"], info["width"], info["height"]
    if frames > limits.max_decoded_frames:
        raise InputError(
            field,
            f"the video has {frames} frames; the limit is {limits.max_decoded_frames} (limits.max_decoded_frames)",
        )
    if frames * width * height > limits.max_decoded_pixels:
        raise InputError(
            field,
            f"the video decodes to {frames} frames of {width}x{height} = {frames * width * height:,} pixels; "
            f"the limit is {limits.max_decoded_pixels:,} (limits.max_decoded_pixels)",
        )
