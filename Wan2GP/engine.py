"""The generation engine: load a model from the catalog, keep it resident, turn task params into a diffusers
pipeline call, and return its frames (:meth:`Engine.render`, a :class:`~Wan2GP.artifact.Rendered`) or the
encoded result (:meth:`Engine.generate`, an :class:`~Wan2GP.artifact.Artifact`).

A plain library: no Ray, no database. One engine holds one pipeline at a time; a second task on the same
model reuses it, and switching to a model that shares components (text encoder, VAE, ...) keeps those.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from Wan2GP.acceleration import (
    AccelerationConfig,
    PromptCache,
    apply_acceleration,
    attention_tokens,
    parse_step_cache,
    step_cache,
    vae_tiling,
)
from Wan2GP.artifact import Artifact, Rendered
from Wan2GP.catalog import (
    Catalog,
    ModelDefinition,
    resolve_model,
    task_family,
    torch_dtype,
)
from Wan2GP.errors import Cancelled, UnsupportedTaskType
from Wan2GP.image_families import IMAGE_TASK_FAMILIES
from Wan2GP.loras import LoraRequest, adapter_name, apply_loras, default_lora_dirs, resolve_lora
from Wan2GP.memory import (
    apply_memory_profile,
    check_profile,
    default_device,
    device_memory_bytes,
    pipeline_bytes,
    release_for_reuse,
)
from Wan2GP.params import BaseParams, parse_params, postprocess_request, quantize_frames
from Wan2GP.phases import (
    Multiplier,
    PhasePlan,
    phase_spec,
    phases_from_steps,
    phases_from_thresholds,
    scheduler_timesteps,
)
from Wan2GP.pipelines import RUNNERS, Settings
from Wan2GP.postprocess import apply_postprocess
from Wan2GP.schedulers import make_scheduler, steps_run

__all__ = ["Cancelled", "Engine", "LoadReport"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass
class LoadReport:
    """What :meth:`Engine.load` did."""

    model_id: str
    seconds: float
    reused: bool  # the whole pipeline was already resident
    components_loaded: list[str] = field(default_factory=list)  # read from disk by this load
    components_reused: list[str] = field(default_factory=list)  # kept from the previous model
    memory_bytes: int = 0  # bytes of the pipeline's weights
    device_memory_bytes: int | None = None  # bytes allocated on the accelerator, when there is one


class Engine:
    """Loads models and runs generation tasks.

    Args:
        device: "cuda", "cuda:1", "cpu"...; default cuda when present, else cpu.
        memory_profile: "resident", "model_offload", "group_offload" or "cpu" (see :mod:`Wan2GP.memory`).
        catalog: the model catalog (default :meth:`Catalog.load`).
        default_models: task type or family -> model id used when a task names no model.
        lora_dirs: folders searched for LoRA names (default ``$HWGP_LORA_DIR``, ``$WAN2GP_CACHE/loras``).
        acceleration: compile / attention backend for every loaded pipeline (see :mod:`Wan2GP.acceleration`).
        prompt_cache_entries: text embeddings kept per prompt (LRU; 0 turns the cache off).
    """

    def __init__(
        self,
        device: str | None = None,
        memory_profile: str = "resident",
        catalog: Catalog | None = None,
        default_models: dict[str, str] | None = None,
        lora_dirs: list[str | Path] | None = None,
        acceleration: AccelerationConfig | None = None,
        prompt_cache_entries: int = 16,
    ):
        self.memory_profile = check_profile(memory_profile)
        self.device = "cpu" if memory_profile == "cpu" else (device or default_device())
        self.acceleration = (acceleration or AccelerationConfig()).check(memory_profile, str(self.device))
        self.applied_acceleration: dict[str, Any] = {}
        self.prompt_cache = PromptCache(prompt_cache_entries)
        self.catalog = catalog if catalog is not None else Catalog.load()
        self.default_models = dict(default_models or {})
        self.lora_dirs = [Path(d) for d in lora_dirs] if lora_dirs is not None else default_lora_dirs()
        self.pipe = None
        self.definition: ModelDefinition | None = None
        self.load_count = 0
        self._component_keys: dict[str, tuple] = {}
        self._base_scheduler = None
        self._base_boundary: float | None = None  # a two-expert model's own boundary_ratio
        self._lock = threading.Lock()  # one load or generation at a time
        # (frames, fps) -> MP4 bytes for `generate`; None: Wan2GP.video.encode_mp4. Wan2GP.parallel swaps in
        # a split encoder.
        self.video_encoder: Callable[..., bytes] | None = None

    @property
    def loaded_model_id(self) -> str | None:
        return self.definition.id if self.definition is not None else None

    # ------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------

    def load(self, model_id: str) -> LoadReport:
        """Make ``model_id`` the resident model, reusing what the current one shares with it."""
        with self._lock:
            return self._load(model_id)

    def _load(self, model_id: str) -> LoadReport:
        definition = self.catalog.get(model_id)
        if self.pipe is not None and self.definition is not None and self.definition.id == definition.id:
            return LoadReport(
                model_id=definition.id,
                seconds=0.0,
                reused=True,
                components_reused=sorted(self._component_keys),
                memory_bytes=pipeline_bytes(self.pipe),
                device_memory_bytes=device_memory_bytes(self.device),
            )

        import diffusers

        start = time.perf_counter()
        folder = self.catalog.resolve_source(definition.source)
        dtypes = {"default": torch_dtype(definition.dtype)}
        dtypes.update({name: torch_dtype(d) for name, d in definition.component_dtypes.items()})
        keys = self._keys(definition, folder, dtypes)

        reuse: dict[str, Any] = {}
        if self.pipe is not None:
            release_for_reuse(self.pipe, self.memory_profile)
            current = self.pipe.components
            for name, key in keys.items():
                if self._component_keys.get(name) == key and current.get(name) is not None:
                    reuse[name] = current[name]
            # Drop our references before reading new weights, so unused modules can be freed first.
            self.pipe = None
            self.prompt_cache.clear()  # embeddings of another model's text encoder
            self.definition = None
            self._component_keys = {}
            del current
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        pipeline_class = getattr(diffusers, definition.pipeline)
        pipe = pipeline_class.from_pretrained(str(folder), dtype=dtypes, local_files_only=True, **reuse)
        pipe.set_progress_bar_config(disable=True)
        apply_memory_profile(pipe, self.memory_profile, self.device)
        defaults = definition.defaults
        self.applied_acceleration = apply_acceleration(
            pipe,
            self.acceleration,
            attention_tokens(definition.family, defaults.width, defaults.height, defaults.frames),
        )
        if hasattr(pipe, "encode_prompt"):
            self.prompt_cache.install(pipe, scope=(definition.id, keys.get("text_encoder")))
        self.load_count += 1

        self.pipe = pipe
        self.definition = definition
        self._component_keys = keys
        self._base_scheduler = pipe.scheduler
        self._base_boundary = getattr(pipe.config, "boundary_ratio", None)
        seconds = time.perf_counter() - start
        loaded = sorted(
            name for name, module in pipe.components.items() if module is not None and name not in reuse
        )
        logger.info("loaded %s in %.2fs (reused %s)", definition.id, seconds, sorted(reuse))
        return LoadReport(
            model_id=definition.id,
            seconds=seconds,
            reused=False,
            components_loaded=loaded,
            components_reused=sorted(reuse),
            memory_bytes=pipeline_bytes(pipe),
            device_memory_bytes=device_memory_bytes(self.device),
        )

    @staticmethod
    def _keys(definition: ModelDefinition, folder: Path, dtypes: dict) -> dict[str, tuple]:
        """Identity of each weight-bearing component: its share key (or file location) and dtype."""
        import json

        index = json.loads((folder / "model_index.json").read_text())
        keys = {}
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or value[0] is None:
                continue
            if name == "scheduler":
                continue  # stateful and cheap: always read fresh
            identity = definition.shared.get(name) or f"{folder}/{name}"
            keys[name] = (identity, str(dtypes.get(name, dtypes["default"])))
        return keys

    def unload(self) -> None:
        """Forget the resident model (its memory is freed once nothing else holds it)."""
        with self._lock:
            if self.pipe is not None:
                release_for_reuse(self.pipe, self.memory_profile)
            self.pipe = None
            self.definition = None
            self._component_keys = {}
            self.prompt_cache.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------

    def resolve_model(self, task_type: str, params: BaseParams) -> ModelDefinition:
        """The model a task runs on: its ``model`` param, else this engine's default, else the catalog's."""
        return resolve_model(self.catalog, self.default_models, task_type, params)

    def generate(
        self,
        task_type: str,
        params: dict[str, Any],
        *,
        task_id: str | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> Artifact:
        """Run one task and return its encoded output (:meth:`render`, then the encode in this thread).

        Raises pydantic.ValidationError for bad params, UnsupportedTaskType / UnknownModel / WeightsNotFound
        for what cannot run here, and Cancelled when ``should_cancel()`` turns True.
        """
        rendered = self.render(
            task_type, params, task_id=task_id, progress=progress, should_cancel=should_cancel
        )
        post = postprocess_request(task_type, params)
        if post is not None:  # output post-processing, here in this thread (served: the runner's CPU stage)
            rendered = apply_postprocess(rendered, post)
        return rendered.encode(self.video_encoder)

    def render(
        self,
        task_type: str,
        params: dict[str, Any],
        *,
        task_id: str | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> Rendered:
        """Run one task and return its uint8 frames and metadata, unencoded: what a GPU replica hands back
        as soon as decoding ends (the encode runs elsewhere, on a CPU). Raises as :meth:`generate` does."""
        if task_type in IMAGE_TASK_FAMILIES:  # Qwen-Image / Z-Image tasks: Wan2GP/image_models.py
            from Wan2GP.image_models import render_image
            from Wan2GP.video import to_uint8_frames

            image, metadata = render_image(
                self, task_type, params, progress=progress, should_cancel=should_cancel
            )
            return Rendered(to_uint8_frames(image[None]), 1, task_id or "output", metadata)
        parsed = parse_params(task_type, params)
        definition = self.resolve_model(task_type, parsed)
        family = task_family(task_type, parsed)
        if family == "generate_video":
            # Now that the model's family is known, validate what that family requires.
            family = definition.family
            parsed = parse_params(family, params)
            if family == "i2v" and parsed.image_end is not None and not definition.last_frame:
                raise UnsupportedTaskType(
                    f"image_end: model {definition.id!r} is an i2v model and takes no last frame; use a flf2v model"
                )
        if family == "single_image" and definition.family == "flux":
            family = "flux"
            parsed = parse_params("flux", {**params, "video_length": 1})
        runner = RUNNERS[family]
        step_request = parse_step_cache(parsed)  # skip_steps_*: a bad value fails here, naming the field

        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled before start")
        with self._lock:
            load_report = self._load(definition.id)
            settings = self._settings(definition, family, parsed)
            # Frames stay on the device until they are uint8: a quarter of float32's bytes cross to the host.
            settings.output_type = "pt"
            loras = apply_loras(self.pipe, settings.loras)
            self.pipe.scheduler = self._scheduler(settings)
            settings.phases = self._phase_plan(settings, family)
            timings: dict[str, float] = {"load": load_report.seconds}
            prompts_before = self.prompt_cache.counts()
            with (
                step_cache(self.pipe, step_request, settings.steps, definition.id) as cache_report,
                vae_tiling(
                    self.pipe,
                    self.acceleration.vae_tiling,
                    settings.width,
                    settings.height,
                    settings.frames or 1,
                    self.device,
                ) as tiled,
            ):
                frames = runner(self.pipe, parsed, settings, timings, progress, should_cancel)
            prompt_cache = self.prompt_cache.counts_since(prompts_before)

            from Wan2GP.video import to_uint8_frames

            # uint8 on the device, then the copy to the host: part of the decode stage.
            start = time.perf_counter()
            frames = to_uint8_frames(frames)
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - start

        metadata = {
            "task_type": task_type,
            "model": definition.id,
            "model_source": definition.source,
            "family": definition.family,
            "frames": int(frames.shape[0]),
            "fps": settings.fps,
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
            "seed": settings.seed,
            "steps": settings.steps,
            "guidance": settings.guidance_scale,
            "flow_shift": settings.flow_shift,
            "sample_solver": settings.sample_solver,
            "loras": loras,
            "phases": settings.phases.describe() if settings.phases is not None else [],
            "ignored_params": parsed.ignored_params(),
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "acceleration": {
                **self.applied_acceleration,
                "step_cache": cache_report and cache_report.as_dict(),
                "vae_tiling": tiled,
                "text_encode_cache": prompt_cache,
            },
        }
        return Rendered(frames, settings.fps, task_id or "output", metadata)

    def _settings(self, definition: ModelDefinition, family: str, params: BaseParams) -> Settings:
        """Merge model defaults, LoRA-flag presets and the task's own params (in that order of priority)."""
        defaults = definition.defaults
        preset_settings: dict[str, float] = {}
        loras: list[LoraRequest] = []
        search = list(self.lora_dirs)
        if definition.source.startswith("tiny:"):
            search.append(self.catalog.resolve_source(definition.source).parent / "loras")

        for builtin in definition.loras:
            loras.append(
                replace(
                    resolve_lora(builtin.file, search), multiplier=Multiplier.constant(builtin.multiplier)
                )
            )
        flags = [("causvid", params.use_causvid_lora), ("lighti2x", params.use_lighti2x_lora)]
        flags.append(("in_scene", bool(getattr(params, "in_scene", False))))
        for preset_name, enabled in flags:
            if not enabled or definition.builtin_lora(preset_name) is not None:
                continue  # a built-in LoRA takes its settings from the model JSON's defaults
            preset = definition.preset(preset_name)
            loras.append(
                replace(resolve_lora(preset.file, search), multiplier=Multiplier.constant(preset.multiplier))
            )
            preset_settings.update(preset.settings)
        for name, multiplier in params.lora_requests():
            loras.append(replace(resolve_lora(name, search), multiplier=multiplier))

        width, height = params.resolution or (defaults.width, defaults.height)
        multiple = definition.size_multiple
        width, height = (
            max(multiple, width // multiple * multiple),
            max(multiple, height // multiple * multiple),
        )

        if family == "flux":
            frames = params.video_length
            if frames > definition.max_images:
                raise ValueError(
                    f"video_length: {definition.id} makes at most {definition.max_images} images"
                )
        elif family in ("single_image", "flux_kontext"):
            frames = 1
        else:
            frames = params.video_length
            guide = getattr(params, "video_guide", None)
            if frames is None and guide is not None:
                frames = quantize_frames(len(guide) - 1) if len(guide) % 4 != 1 else len(guide)
            frames = frames or quantize_frames(defaults.frames)

        seed = params.seed if params.seed >= 0 else random.SystemRandom().randrange(2**32)
        solver = params.sample_solver or defaults.sample_solver
        steps = params.num_inference_steps or int(
            preset_settings.get("num_inference_steps", defaults.num_inference_steps)
        )
        guidance = params.guidance_scale
        if guidance is None:
            guidance = float(preset_settings.get("guidance_scale", defaults.guidance_scale))
        shift = params.flow_shift or preset_settings.get("flow_shift", defaults.flow_shift)
        phases = phase_spec(definition, params, guidance)
        if (
            params.phase_config is not None
        ):  # its steps, shift and solver replace the task's (the original's way)
            steps = sum(params.phase_config.steps_per_phase)
            shift, solver = params.phase_config.flow_shift, params.phase_config.sample_solver
            guidance = phases.guidance[0]
        steps = steps_run(solver, steps)
        negative = params.negative_prompt if params.negative_prompt is not None else defaults.negative_prompt
        return Settings(
            width=width,
            height=height,
            frames=frames,
            fps=params.fps or defaults.fps,
            steps=steps,
            guidance_scale=guidance,
            flow_shift=float(shift) if shift is not None else None,
            sample_solver=solver,
            negative_prompt=negative,
            max_sequence_length=defaults.max_sequence_length,
            seed=seed,
            loras=loras,
            phase_spec=phases,
        )

    def _phase_plan(self, settings: Settings, family: str) -> PhasePlan | None:
        """Step-by-step phases of this run on the loaded pipeline (None for Flux, which has no phases)."""
        spec = settings.phase_spec
        if family in ("flux", "flux_kontext"):
            if spec.steps_per_phase is not None or len(spec.guidance) > 1:
                raise UnsupportedTaskType("phase_config: denoising phases run on Wan models only")
            if any(not request.multiplier.is_constant for request in settings.loras):
                raise UnsupportedTaskType("loras_multipliers: per-phase multipliers need a Wan model")
            return None
        timesteps = scheduler_timesteps(self.pipe.scheduler, settings.steps)
        two_experts = getattr(self.pipe, "transformer_2", None) is not None
        if spec.steps_per_phase is not None:
            if sum(spec.steps_per_phase) != len(timesteps):
                raise ValueError(
                    f"phase_config: steps_per_phase {spec.steps_per_phase} sum to {sum(spec.steps_per_phase)} "
                    f"but solver {settings.sample_solver} runs {len(timesteps)} steps"
                )
            phase_of_step = phases_from_steps(spec.steps_per_phase)
        else:
            thresholds = list(spec.thresholds)
            if two_experts and thresholds[0] is None:  # the model's own expert boundary
                thresholds[0] = self._base_boundary * 1000.0
            if two_experts and len(spec.guidance) == 1:  # the experts still switch: one guidance for both
                spec.guidance = spec.guidance * 2
            phase_of_step = phases_from_thresholds(timesteps, len(spec.guidance), thresholds)
        plan = PhasePlan(
            phase_of_step=phase_of_step,
            guidance=list(spec.guidance),
            model_switch_phase=spec.model_switch_phase,
            two_experts=two_experts,
            timesteps=timesteps,
        )
        for request in settings.loras:
            try:
                steps = request.multiplier.per_step(phase_of_step, plan.num_phases, plan.model_switch_phase)
            except ValueError as error:
                raise ValueError(f"loras_multipliers: {error}") from None
            plan.lora_steps[adapter_name(request.path)] = steps
            plan.lora_files[adapter_name(request.path)] = request.name or request.path.name
        return plan

    def _scheduler(self, settings: Settings):
        """A fresh scheduler per task, with the task's flow shift and solver (no state leaks between tasks)."""
        return make_scheduler(self._base_scheduler, settings.sample_solver, settings.flow_shift)
