"""The generation engine: load a model from the catalog, keep it resident, turn task params into a diffusers
pipeline call, and return the encoded result as an :class:`~Wan2GP.artifact.Artifact`.

A plain library: no Ray, no database. One engine holds one pipeline at a time; a second task on the same
model reuses it, and switching to a model that shares components (text encoder, VAE, ...) keeps those.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from Wan2GP.artifact import Artifact
from Wan2GP.catalog import (
    COMPATIBLE_FAMILIES,
    TASK_FAMILIES,
    Catalog,
    ModelDefinition,
    family_of_task_type,
    torch_dtype,
)
from Wan2GP.errors import Cancelled, UnsupportedTaskType
from Wan2GP.image_families import IMAGE_TASK_FAMILIES
from Wan2GP.loras import LoraRequest, apply_loras, default_lora_dirs, resolve_lora
from Wan2GP.memory import (
    apply_memory_profile,
    check_profile,
    default_device,
    device_memory_bytes,
    pipeline_bytes,
    release_for_reuse,
)
from Wan2GP.params import BaseParams, parse_params, quantize_frames
from Wan2GP.pipelines import RUNNERS, Settings

__all__ = ["Cancelled", "Engine", "LoadReport", "resolve_model"]

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
    """

    def __init__(
        self,
        device: str | None = None,
        memory_profile: str = "resident",
        catalog: Catalog | None = None,
        default_models: dict[str, str] | None = None,
        lora_dirs: list[str | Path] | None = None,
    ):
        self.memory_profile = check_profile(memory_profile)
        self.device = "cpu" if memory_profile == "cpu" else (device or default_device())
        self.catalog = catalog if catalog is not None else Catalog.load()
        self.default_models = dict(default_models or {})
        self.lora_dirs = [Path(d) for d in lora_dirs] if lora_dirs is not None else default_lora_dirs()
        self.pipe = None
        self.definition: ModelDefinition | None = None
        self.load_count = 0
        self._component_keys: dict[str, tuple] = {}
        self._base_scheduler = None
        self._lock = threading.Lock()  # one load or generation at a time
        # (frames, fps) -> MP4 bytes; None: Wan2GP.video.encode_mp4. Wan2GP.parallel swaps in a split encoder.
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
            self.definition = None
            self._component_keys = {}
            del current
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        pipeline_class = getattr(diffusers, definition.pipeline)
        pipe = pipeline_class.from_pretrained(str(folder), dtype=dtypes, local_files_only=True, **reuse)
        pipe.set_progress_bar_config(disable=True)
        apply_memory_profile(pipe, self.memory_profile, self.device)
        self.load_count += 1

        self.pipe = pipe
        self.definition = definition
        self._component_keys = keys
        self._base_scheduler = pipe.scheduler
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
        """Run one task and return its encoded output.

        Raises pydantic.ValidationError for bad params, UnsupportedTaskType / UnknownModel / WeightsNotFound
        for what cannot run here, and Cancelled when ``should_cancel()`` turns True.
        """
        if task_type in IMAGE_TASK_FAMILIES:  # Qwen-Image / Z-Image tasks: Wan2GP/image_models.py
            from Wan2GP.image_models import generate_image

            return generate_image(
                self, task_type, params, task_id=task_id, progress=progress, should_cancel=should_cancel
            )
        parsed = parse_params(task_type, params)
        definition = self.resolve_model(task_type, parsed)
        task_family = _task_family(task_type, parsed)
        if task_family == "generate_video":
            # Now that the model's family is known, validate what that family requires.
            task_family = definition.family
            parsed = parse_params(task_family, params)
            if task_family == "i2v" and parsed.image_end is not None:
                raise UnsupportedTaskType(
                    f"image_end: model {definition.id!r} is an i2v model and takes no last frame; use a flf2v model"
                )
        if task_family == "single_image" and definition.family == "flux":
            task_family = "flux"
            parsed = parse_params("flux", {**params, "video_length": 1})
        runner = RUNNERS[task_family]

        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled before start")
        with self._lock:
            load_report = self._load(definition.id)
            settings = self._settings(definition, task_family, parsed)
            loras = apply_loras(self.pipe, settings.loras)
            self.pipe.scheduler = self._scheduler(settings)
            timings: dict[str, float] = {"load": load_report.seconds}
            frames = runner(self.pipe, parsed, settings, timings, progress, should_cancel)

        from Wan2GP.video import encode_mp4, encode_png, to_uint8_frames

        start = time.perf_counter()
        frames = to_uint8_frames(frames)
        if len(frames) == 1:
            data, extension, media_type = encode_png(frames[0]), "png", "image/png"
        else:
            encode = self.video_encoder or encode_mp4
            data, extension, media_type = encode(frames, fps=settings.fps), "mp4", "video/mp4"
        timings["encode_file"] = time.perf_counter() - start

        metadata = {
            "task_type": task_type,
            "model": definition.id,
            "family": definition.family,
            "frames": int(frames.shape[0]),
            "fps": settings.fps,
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
            "seed": settings.seed,
            "steps": settings.steps,
            "guidance": settings.guidance_scale,
            "flow_shift": settings.flow_shift,
            "loras": loras,
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        return Artifact(
            data=data, filename=f"{task_id or 'output'}.{extension}", media_type=media_type, metadata=metadata
        )

    def _settings(self, definition: ModelDefinition, task_family: str, params: BaseParams) -> Settings:
        """Merge model defaults, LoRA-flag presets and the task's own params (in that order of priority)."""
        defaults = definition.defaults
        preset_settings: dict[str, float] = {}
        loras: list[LoraRequest] = []
        search = list(self.lora_dirs)
        if definition.source.startswith("tiny:"):
            search.append(self.catalog.resolve_source(definition.source).parent / "loras")

        for builtin in definition.loras:
            loras.append(LoraRequest(resolve_lora(builtin.file, search), builtin.multiplier))
        flags = [("causvid", params.use_causvid_lora), ("lighti2x", params.use_lighti2x_lora)]
        flags.append(("in_scene", bool(getattr(params, "in_scene", False))))
        for preset_name, enabled in flags:
            if not enabled or definition.builtin_lora(preset_name) is not None:
                continue  # a built-in LoRA takes its settings from the model JSON's defaults
            preset = definition.preset(preset_name)
            loras.append(LoraRequest(resolve_lora(preset.file, search), preset.multiplier))
            preset_settings.update(preset.settings)
        for name, multiplier in params.lora_requests():
            loras.append(LoraRequest(resolve_lora(name, search), multiplier))

        width, height = params.resolution or (defaults.width, defaults.height)
        multiple = definition.size_multiple
        width, height = (
            max(multiple, width // multiple * multiple),
            max(multiple, height // multiple * multiple),
        )

        if task_family == "flux":
            frames = params.video_length
            if frames > definition.max_images:
                raise ValueError(
                    f"video_length: {definition.id} makes at most {definition.max_images} images"
                )
        elif task_family in ("single_image", "flux_kontext"):
            frames = 1
        else:
            frames = params.video_length
            guide = getattr(params, "video_guide", None)
            if frames is None and guide is not None:
                frames = quantize_frames(len(guide) - 1) if len(guide) % 4 != 1 else len(guide)
            frames = frames or quantize_frames(defaults.frames)

        seed = params.seed if params.seed >= 0 else random.SystemRandom().randrange(2**32)
        steps = params.num_inference_steps or int(
            preset_settings.get("num_inference_steps", defaults.num_inference_steps)
        )
        guidance = params.guidance_scale
        if guidance is None:
            guidance = float(preset_settings.get("guidance_scale", defaults.guidance_scale))
        shift = params.flow_shift or preset_settings.get("flow_shift", defaults.flow_shift)
        negative = params.negative_prompt if params.negative_prompt is not None else defaults.negative_prompt
        return Settings(
            width=width,
            height=height,
            frames=frames,
            fps=params.fps or defaults.fps,
            steps=steps,
            guidance_scale=guidance,
            flow_shift=float(shift) if shift is not None else None,
            sample_solver=params.sample_solver or defaults.sample_solver,
            negative_prompt=negative,
            max_sequence_length=defaults.max_sequence_length,
            seed=seed,
            loras=loras,
        )

    def _scheduler(self, settings: Settings):
        """A fresh scheduler per task, with the task's flow shift and solver (no state leaks between tasks)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        base = self._base_scheduler
        config = dict(base.config)
        if settings.sample_solver == "euler":
            cls = FlowMatchEulerDiscreteScheduler
        elif settings.sample_solver == "unipc":
            cls = UniPCMultistepScheduler
            config.update(prediction_type="flow_prediction", use_flow_sigmas=True)
        else:
            cls = type(base)
        if settings.flow_shift is not None:
            if cls is FlowMatchEulerDiscreteScheduler:
                config.update(shift=settings.flow_shift, use_dynamic_shifting=False)
            else:
                config["flow_shift"] = settings.flow_shift
        return cls.from_config(config)


def resolve_model(
    catalog: Catalog, default_models: dict[str, str], task_type: str, params: BaseParams
) -> ModelDefinition:
    """The model a task runs on: its ``model`` param, else ``default_models`` (by task type, then family),
    else the catalog's default. Also used by the Serve ingress to route a task before it runs."""
    task_family = _task_family(task_type, params)
    # A task type's own default wins, unless its params changed the family (i2v + image_end -> flf2v).
    keys = [task_type, task_family] if task_family == family_of_task_type(task_type) else [task_family]
    model_id = params.model or next((default_models[k] for k in keys if k in default_models), None)
    if model_id is None and task_family in ("single_image", "generate_video"):
        model_id = default_models.get("t2v")
    if model_id is not None:
        definition = catalog.get(model_id)
    else:
        fallback = "t2v" if task_family in ("single_image", "generate_video") else task_family
        definition = catalog.default_for(fallback)
    if task_family == "flf2v" and definition.family == "i2v":
        raise UnsupportedTaskType(
            f"image_end: model {definition.id!r} is an i2v model and takes no last frame; use a flf2v model"
        )
    if definition.family not in COMPATIBLE_FAMILIES[task_family]:
        raise UnsupportedTaskType(
            f"model {definition.id!r} is a {definition.family} model; task_type {task_type!r} needs one of: "
            f"{', '.join(sorted(COMPATIBLE_FAMILIES[task_family]))}"
        )
    return definition


def _task_family(task_type: str, params: BaseParams) -> str:
    """The family of a task; an ``i2v`` task with an ``image_end`` is first-last-frame."""
    family_of_task_type(task_type)  # rejects unsupported task types
    family = TASK_FAMILIES[task_type]
    if family == "i2v" and getattr(params, "image_end", None) is not None:
        return "flf2v"
    return family
