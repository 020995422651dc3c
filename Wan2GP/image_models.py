"""Generation of the image-model task types (Qwen-Image, Qwen-Image-Edit, Z-Image Turbo) on an
:class:`~Wan2GP.engine.Engine`: params -> the model's diffusers pipeline -> one PNG artifact.

The engine loads and keeps the model as for any family (``Engine._load``, shared components reused); this module
turns a task into the pipeline call the original's handler amounts to:

- ``qwen_image``: text-to-image (``QwenImagePipeline``, built on the resident Qwen model's components).
- ``qwen_image_edit``: ``QwenImageEditPipeline`` on ``image``; the output takes the image's aspect ratio at the
  requested area, as the original's "K" sizing does.
- ``image_inpaint`` / ``annotated_image_edit``: the marked area of ``image_url`` (``mask_url`` white) painted
  green, then edited with the task's LoRA, as the original composites it.
- ``qwen_image_style``: an edit of the style or subject reference (text-to-image without one), with the style,
  subject and scene LoRAs at their strengths and the original's prompt prefixes.
- ``z_image_turbo`` / ``z_image_turbo_i2i``: ``ZImagePipeline`` / ``ZImageImg2ImgPipeline`` (``strength``).

Every Qwen task adds the original's Lightning LoRA at its strength (``lightning_lora_strength_phase_1``; 0 runs
without it); LoRAs are files in the engine's LoRA folders, never downloaded.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from Wan2GP.artifact import Artifact
from Wan2GP.errors import Cancelled
from Wan2GP.image_families import IMAGE_TASK_FAMILIES
from Wan2GP.image_params import (
    QWEN_DEFAULT_NEGATIVE,
    RECIPES,
    SCENE_LORA,
    STYLE_LORA,
    SUBJECT_LORA,
    Z_IMAGE_AUTO_PIXELS,
    ImageTaskParams,
    QwenEditParams,
    QwenMaskedEditParams,
    QwenStyleParams,
    ZImageToImageParams,
    cap_qwen_resolution,
    fit_to_image,
    parse_image_params,
)
from Wan2GP.loras import LoraRequest, apply_loras, resolve_lora
from Wan2GP.phases import Multiplier
from Wan2GP.pipelines import _generator, _StepHook

if TYPE_CHECKING:
    from Wan2GP.catalog import ModelDefinition
    from Wan2GP.engine import Engine

IMAGE_TASK_TYPES = frozenset(IMAGE_TASK_FAMILIES)
GREEN = (0, 255, 0)  # the original's inpaint / annotation overlay colour

# WGP's Qwen scheduler for sample_solver "lightning" (models/qwen/qwen_main.py): the distilled shift of 3.
_LIGHTNING_SCHEDULER = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
    "max_image_seq_len": 8192,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}


def generate_image(
    engine: Engine,
    task_type: str,
    params: dict[str, Any],
    *,
    task_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Artifact:
    """Run one image task on ``engine`` and return its PNG.

    Raises pydantic.ValidationError for bad params, UnsupportedTaskType / UnknownModel / WeightsNotFound for
    what cannot run here, and Cancelled when ``should_cancel()`` turns True.
    """
    from Wan2GP.video import encode_png, to_uint8_frames

    image, metadata = render_image(engine, task_type, params, progress=progress, should_cancel=should_cancel)
    start = time.perf_counter()
    data = encode_png(to_uint8_frames(image[None])[0])
    metadata["timings"]["encode_file"] = round(time.perf_counter() - start, 4)
    return Artifact(
        data=data, filename=f"{task_id or 'output'}.png", media_type="image/png", metadata=metadata
    )


def render_image(
    engine: Engine,
    task_type: str,
    params: dict[str, Any],
    *,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The image of one task as floats (H, W, 3) in [0, 1], before encoding, with its metadata."""
    from Wan2GP.catalog import resolve_model

    parsed = parse_image_params(task_type, params)
    definition = resolve_model(engine.catalog, engine.default_models, task_type, parsed)
    recipe = RECIPES[task_type]
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled before start")

    with engine._lock:
        load_report = engine._load(definition.id)
        loras = apply_loras(engine.pipe, _lora_requests(engine, definition, task_type, parsed))
        engine.pipe.scheduler = _fresh_scheduler(engine._base_scheduler, parsed.sample_solver)
        timings: dict[str, float] = {"load": load_report.seconds}
        seed = parsed.seed if parsed.seed >= 0 else random.SystemRandom().randrange(2**32)
        steps = parsed.num_inference_steps or recipe.steps
        if steps < 2 and engine.pipe.scheduler.config.get("shift_terminal"):
            # One step would stretch the schedule to its terminal by dividing by zero: a NaN image.
            raise ValueError("num_inference_steps: this model's schedule needs at least 2 steps")
        call = _pipeline_call(engine.pipe, definition, task_type, parsed)
        call.update(num_inference_steps=steps, generator=_generator(seed))
        guidance = parsed.guidance_scale if parsed.guidance_scale is not None else recipe.guidance
        pipe = call.pop("pipe")
        if definition.family == "z_image":
            call.update(guidance_scale=guidance, negative_prompt=parsed.negative_prompt or None)
        else:
            # WGP passes the task's guidance as Qwen's true CFG scale, with its default negative prompt.
            call.update(
                true_cfg_scale=guidance, negative_prompt=parsed.negative_prompt or QWEN_DEFAULT_NEGATIVE
            )
        image = _run(pipe, call, timings, progress, should_cancel)

    metadata = {
        "task_type": task_type,
        "model": definition.id,
        "family": definition.family,
        "frames": 1,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "prompt": call["prompt"],
        "sample_solver": parsed.sample_solver or "default",
        "loras": loras,
        "ignored_params": parsed.ignored_params(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    return image, metadata


# ----------------------------------------------------------------------------------------------------------
# The pipeline call of each task type
# ----------------------------------------------------------------------------------------------------------


def _pipeline_call(pipe, definition: ModelDefinition, task_type: str, params: ImageTaskParams) -> dict:
    """The pipeline to run (``pipe``) and its task-specific arguments: prompt, size, input image."""
    width, height = _requested_size(definition, task_type, params)
    if definition.family == "z_image":
        if isinstance(params, ZImageToImageParams):
            if not params.uses_resolution:
                width, height = _fit_area(Z_IMAGE_AUTO_PIXELS, params.image, definition.size_multiple)
            return {
                "pipe": _as_pipeline(pipe, "ZImageImg2ImgPipeline"),
                "prompt": params.prompt or " ",
                "image": _pil(params.image, width, height),
                "strength": params.denoising_strength,
                "width": width,
                "height": height,
            }
        return {
            "pipe": _as_pipeline(pipe, "ZImagePipeline"),
            "prompt": params.prompt,
            "width": width,
            "height": height,
        }

    image = _qwen_input_image(params)
    if image is None:  # text-to-image: qwen_image, or qwen_image_style without a reference
        prompt = params.styled_prompt() if isinstance(params, QwenStyleParams) else params.prompt
        return {
            "pipe": _as_pipeline(pipe, "QwenImagePipeline"),
            "prompt": prompt,
            "width": width,
            "height": height,
        }
    width, height = fit_to_image(width, height, image, definition.size_multiple)
    prompt = params.styled_prompt() if isinstance(params, QwenStyleParams) else params.prompt
    return {
        "pipe": _as_pipeline(pipe, "QwenImageEditPipeline"),
        "prompt": prompt or " ",  # the original's minimal prompt for edits without one
        "image": Image.fromarray(image),
        "width": width,
        "height": height,
    }


def _qwen_input_image(params: ImageTaskParams) -> np.ndarray | None:
    """The image a Qwen task edits: the input, the green-marked composite, or the style/subject reference."""
    if isinstance(params, QwenEditParams):
        return params.image
    if isinstance(params, QwenMaskedEditParams):
        return green_composite(_cap_image(params.image), params.mask_url)
    if isinstance(params, QwenStyleParams):
        return params.reference_image
    return None


def green_composite(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original's inpaint/annotation input: pixels where the mask is white (>= 128) painted pure green.
    The mask is resized to the image first."""
    height, width = image.shape[:2]
    grey = Image.fromarray(mask).convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.LANCZOS)
    marked = np.asarray(grey) >= 128
    composite = image.copy()
    composite[marked] = GREEN
    return composite


def _cap_image(image: np.ndarray) -> np.ndarray:
    """Images over 1200 px a side scaled down to fit, as the original does before compositing."""
    height, width = image.shape[:2]
    new_width, new_height = cap_qwen_resolution(width, height)
    if (new_width, new_height) == (width, height):
        return image
    return np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.LANCZOS))


def _requested_size(definition: ModelDefinition, task_type: str, params: ImageTaskParams) -> tuple[int, int]:
    """The task's resolution (else the recipe's, else the model's), Qwen's 1200 px cap, the model's multiple."""
    width, height = (
        params.resolution
        or RECIPES[task_type].resolution
        or (
            definition.defaults.width,
            definition.defaults.height,
        )
    )
    if definition.family != "z_image":
        width, height = cap_qwen_resolution(width, height)
    multiple = definition.size_multiple
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def _fit_area(pixels: int, image: np.ndarray, multiple: int) -> tuple[int, int]:
    """``image``'s aspect ratio at ``pixels`` pixels, each side a multiple of ``multiple``."""
    side = int(math.sqrt(pixels))
    return fit_to_image(side, side, image, multiple)


def _pil(image: np.ndarray, width: int, height: int) -> Image.Image:
    from Wan2GP.video import fit_resolution

    return Image.fromarray(fit_resolution(image, width, height, "crop"))


def _as_pipeline(pipe, class_name: str):
    """``pipe``'s modules (no copy, hooks and LoRAs included) under the ``class_name`` pipeline: one resident
    model serves text-to-image, edits and image-to-image. Built directly rather than with ``from_pipe``, which
    also casts every module and refuses group-offloaded ones."""
    import inspect

    import diffusers

    pipeline_class = getattr(diffusers, class_name)
    if type(pipe) is pipeline_class:
        return pipe
    accepted = inspect.signature(pipeline_class.__init__).parameters
    converted = pipeline_class(
        **{name: module for name, module in pipe.components.items() if name in accepted}
    )
    converted.set_progress_bar_config(disable=True)
    return converted


# ----------------------------------------------------------------------------------------------------------
# LoRAs, scheduler, the call itself
# ----------------------------------------------------------------------------------------------------------


def _lora_requests(
    engine: Engine, definition: ModelDefinition, task_type: str, params: ImageTaskParams
) -> list[LoraRequest]:
    """The original's LoRAs for the task (Lightning, the task's own, style/subject/scene), then the task's."""
    search = list(engine.lora_dirs)
    if definition.source.startswith("tiny:"):
        search.append(engine.catalog.resolve_source(definition.source).parent / "loras")
    recipe = RECIPES[task_type]
    wanted: list[tuple[str, float]] = []
    if recipe.lightning is not None:
        strength = params.lightning_lora_strength_phase_1
        strength = recipe.lightning_strength if strength is None else strength
        if strength > 0.0:
            wanted.append((recipe.lightning, strength))
    if recipe.task_lora is not None:
        wanted.append((recipe.task_lora, 1.0))
    if isinstance(params, QwenStyleParams):
        for file, strength in (
            (STYLE_LORA, params.style_reference_strength),
            (SUBJECT_LORA, params.subject_strength),
            (SCENE_LORA, params.scene_reference_strength),
        ):
            if strength > 0.0:
                wanted.append((file, strength))
    wanted += params.lora_requests()
    return [lora_request(name, multiplier, search) for name, multiplier in wanted]


def lora_request(name: str, multiplier: float, search: list) -> LoraRequest:
    """A LoRA file by name from the LoRA folders, at ``multiplier``."""
    return replace(resolve_lora(name, search), multiplier=Multiplier.constant(multiplier))


def _fresh_scheduler(base, sample_solver: str | None):
    """A fresh copy of the model's scheduler per task (no state leaks between tasks); "lightning" takes WGP's
    distilled-shift settings."""
    config = dict(base.config)
    if sample_solver == "lightning":
        config.update(_LIGHTNING_SCHEDULER)
    return type(base).from_config(config)


def _run(pipe, call: dict, timings: dict, progress, should_cancel) -> np.ndarray:
    """The pipeline call with progress and cancel at each step; returns the image as floats (H, W, 3)."""
    hook = _StepHook(progress, should_cancel)
    start = time.perf_counter()
    output = pipe(
        output_type="np",
        callback_on_step_end=hook,
        callback_on_step_end_tensor_inputs=["latents"],
        **call,
    )
    end = time.perf_counter()
    last = hook.last_step_end or end
    timings["denoise"] = last - start
    timings["decode"] = end - last
    return output.images[0]
