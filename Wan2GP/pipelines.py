"""One generation function per family: task params + resolved settings -> a diffusers pipeline call.

Each runner encodes the prompt itself (so its time is measured on its own), then calls the pipeline with
``output_type="np"`` and a step callback that reports progress and raises :class:`Cancelled`. The pipeline
call is split into denoise (until the last step's callback) and decode (the rest: VAE decode and
post-processing). Runners return float frames (T, H, W, 3) in [0, 1]; with ``Settings.output_type="pt"`` (the
engine's choice) a tensor on the pipeline's device instead, channels first, that the engine turns into uint8
there before the copy to the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from Wan2GP.errors import Cancelled
from Wan2GP.loras import LoraRequest
from Wan2GP.phases import PhasePlan, PhaseRunner, PhaseSpec
from Wan2GP.solvers import STOCHASTIC_SOLVERS

GREY = 127  # the grey VACE reads as "nothing here, generate"


@dataclass
class Settings:
    """Everything a runner needs beyond the params: model defaults, presets and the task merged."""

    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance_scale: float
    flow_shift: float | None
    sample_solver: str | None
    negative_prompt: str
    max_sequence_length: int
    seed: int
    loras: list[LoraRequest] = field(default_factory=list)
    phase_spec: PhaseSpec | None = None
    phases: PhasePlan | None = None  # set once the pipeline and its scheduler are ready
    output_type: str = "np"  # "pt": frames stay on the device (the engine converts them to uint8 there)

    @property
    def call_guidance(self) -> float:
        """The guidance the pipeline runs with (phases adjust it step by step, see Wan2GP.phases)."""
        return self.phases.call_guidance if self.phases is not None else self.guidance_scale


class _StepHook:
    """``callback_on_step_end``: phase changes, progress, cancel, and the time of the last denoising step."""

    def __init__(
        self,
        progress: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        phases: PhaseRunner | None = None,
    ):
        self.progress = progress
        self.should_cancel = should_cancel
        self.phases = phases
        self.last_step_end: float | None = None

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.last_step_end = time.perf_counter()
        if self.phases is not None:
            self.phases.step_end(step)
        total = pipe.num_timesteps
        if self.progress is not None:
            self.progress(step + 1, total)
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled after denoising step {step + 1}/{total}")
        return {}


def _generator(seed: int) -> torch.Generator:
    # A CPU generator gives the same noise on every device, so a seed reproduces across CPU and GPU.
    return torch.Generator("cpu").manual_seed(seed)


# uint8 level -> level / 255 in float32, correctly rounded (as numpy and torch divide on the CPU). CUDA
# divides by multiplying with the reciprocal: 126 of the 256 levels come out one unit in the last place off
# (measured on an H200), so on a GPU the levels are looked up in this table instead.
_UNIT_LEVELS = torch.arange(256, dtype=torch.float32) / 255.0


def unit_levels(frames: torch.Tensor, lookup: bool | None = None) -> torch.Tensor:
    """uint8 ``frames`` as float32 in [0, 1], exactly ``level / 255`` on every device (``lookup``: use the
    table; by default on any device but the CPU, where dividing is exact and faster)."""
    if lookup is None:
        lookup = frames.device.type != "cpu"
    if lookup:
        return _UNIT_LEVELS.to(frames.device)[frames.long()]
    return frames.to(torch.float32) / 255.0


def video_tensor(frames: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames as the (1, T, 3, H, W) float tensor in [0, 1] that diffusers' video processor
    takes, made on ``device``. Given PIL frames instead, the processor converts, resizes and normalises them
    on the CPU whatever the device, then copies float frames; here the uint8 frames are copied once and all
    of that runs where the pipeline runs, with the same arithmetic, so the tensors are bit-identical."""
    frames = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return unit_levels(frames.permute(0, 3, 1, 2)).unsqueeze(0)


def _pil(image: np.ndarray, width: int, height: int) -> Image.Image:
    from Wan2GP.video import fit_resolution

    return Image.fromarray(fit_resolution(image, width, height, "crop"))


def _run(pipe, kwargs: dict, settings: Settings, timings: dict, progress, should_cancel) -> np.ndarray:
    phases = PhaseRunner(pipe, settings.phases) if settings.phases is not None else None
    hook = _StepHook(progress, should_cancel, phases)
    if settings.sample_solver in STOCHASTIC_SOLVERS:
        # The pipelines do not hand their generator to scheduler.step: seed the noise an SDE step draws.
        torch.manual_seed(settings.seed)
    if getattr(pipe.config, "boundary_ratio", None) is not None:
        kwargs["guidance_scale_2"] = settings.call_guidance  # phases set each expert's guidance
    start = time.perf_counter()
    if phases is not None:
        phases.install()
    try:
        output = pipe(
            num_inference_steps=settings.steps,
            guidance_scale=settings.call_guidance,
            generator=_generator(settings.seed),
            output_type=kwargs.pop("output_type", settings.output_type),
            callback_on_step_end=hook,
            callback_on_step_end_tensor_inputs=["latents"],
            **kwargs,
        )
    finally:
        if phases is not None:
            phases.remove()
    end = time.perf_counter()
    last = hook.last_step_end or end
    timings["denoise"] = last - start
    timings["decode"] = end - last
    return output


def _encode_wan_prompt(pipe, params, settings: Settings, timings: dict) -> dict:
    start = time.perf_counter()
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=params.prompt,
            negative_prompt=settings.negative_prompt,
            do_classifier_free_guidance=settings.call_guidance > 1.0,
            num_videos_per_prompt=1,
            max_sequence_length=settings.max_sequence_length,
            device=pipe._execution_device,
        )
    timings["encode_prompt"] = time.perf_counter() - start
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}


def _encode_flux_prompt(pipe, params, settings: Settings, timings: dict) -> dict:
    start = time.perf_counter()
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=params.prompt,
            prompt_2=None,
            device=pipe._execution_device,
            max_sequence_length=settings.max_sequence_length,
        )
    timings["encode_prompt"] = time.perf_counter() - start
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def run_t2v(pipe, params, settings: Settings, timings: dict, progress=None, should_cancel=None) -> np.ndarray:
    """Text-to-video with WanPipeline (also any Wan pipeline with no conditioning)."""
    kwargs = _encode_wan_prompt(pipe, params, settings, timings)
    kwargs.update(height=settings.height, width=settings.width, num_frames=settings.frames)
    return _run(pipe, kwargs, settings, timings, progress, should_cancel).frames[0]


def run_single_image(pipe, params, settings: Settings, timings: dict, progress=None, should_cancel=None):
    """One frame of a video model (a Wan pipeline asked for 1 frame)."""
    settings.frames = 1
    return run_t2v(pipe, params, settings, timings, progress, should_cancel)


def run_i2v(pipe, params, settings: Settings, timings: dict, progress=None, should_cancel=None) -> np.ndarray:
    """Image-to-video; with ``image_end`` it is first-last-frame-to-video (same pipeline, ``last_image``)."""
    kwargs = _encode_wan_prompt(pipe, params, settings, timings)
    kwargs.update(
        image=_pil(params.image_start, settings.width, settings.height),
        height=settings.height,
        width=settings.width,
        num_frames=settings.frames,
    )
    if params.image_end is not None:
        kwargs["last_image"] = _pil(params.image_end, settings.width, settings.height)
    return _run(pipe, kwargs, settings, timings, progress, should_cancel).frames[0]


def _fit_length(frames: np.ndarray, count: int, fill: int) -> np.ndarray:
    """Trim ``frames`` to ``count`` or pad them with frames of value ``fill``."""
    if len(frames) >= count:
        return frames[:count]
    pad = np.full((count - len(frames), *frames.shape[1:]), fill, dtype=np.uint8)
    return np.concatenate([frames, pad])


def run_vace(
    pipe, params, settings: Settings, timings: dict, progress=None, should_cancel=None
) -> np.ndarray:
    """VACE: guide video + mask (white = generate, black = keep) + reference images + conditioning scale."""
    from Wan2GP.video import fit_resolution

    kwargs = _encode_wan_prompt(pipe, params, settings, timings)
    w, h, count = settings.width, settings.height, settings.frames
    if params.video_guide is not None:
        guide = _fit_length(fit_resolution(params.video_guide, w, h, "crop"), count, GREY)
        kwargs["video"] = video_tensor(guide, pipe._execution_device)
        if params.video_mask is not None:
            mask = fit_resolution(params.video_mask, w, h, "stretch")
            # Frames past the end of the given mask are padding of the guide: generate them.
            mask = _fit_length(mask, count, 255)
            kwargs["mask"] = video_tensor(mask, pipe._execution_device)
    if params.image_refs:
        kwargs["reference_images"] = [_pil(ref, w, h) for ref in params.image_refs]
    kwargs.update(height=h, width=w, num_frames=count, conditioning_scale=params.control_net_weight)
    frames = _run(pipe, kwargs, settings, timings, progress, should_cancel).frames[0]
    # Reference images are prepended as latent frames and removed by the pipeline; keep the asked length.
    return frames[-count:]


def run_flux(
    pipe, params, settings: Settings, timings: dict, progress=None, should_cancel=None
) -> np.ndarray:
    """Flux text-to-image: ``settings.frames`` images of the prompt."""
    kwargs = _encode_flux_prompt(pipe, params, settings, timings)
    kwargs.update(height=settings.height, width=settings.width, num_images_per_prompt=settings.frames)
    return _run(pipe, kwargs, settings, timings, progress, should_cancel).images


def run_flux_kontext(pipe, params, settings: Settings, timings: dict, progress=None, should_cancel=None):
    """Flux Kontext image edit (``magic_edit``): ``image_url`` edited as ``prompt`` says."""
    kwargs = _encode_flux_prompt(pipe, params, settings, timings)
    kwargs.update(
        image=_pil(params.image_url, settings.width, settings.height),
        height=settings.height,
        width=settings.width,
        max_area=settings.width * settings.height,  # keep the asked size (Kontext rescales to max_area)
        _auto_resize=False,
    )
    return _run(pipe, kwargs, settings, timings, progress, should_cancel).images


RUNNERS = {
    "t2v": run_t2v,
    "i2v": run_i2v,
    "flf2v": run_i2v,
    "vace": run_vace,
    "flux": run_flux,
    "flux_kontext": run_flux_kontext,
    "single_image": run_single_image,
}
