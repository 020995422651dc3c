"""Model catalog: one JSON definition per model, like upstream Wan2GP's model definitions.

Definitions ship in ``Wan2GP/models/*.json``; users add models by dropping JSON files into the folder named
by ``$HWGP_MODELS_DIR`` (a definition there replaces a shipped one with the same ``id``). A definition names
the family, the diffusers pipeline class, where the weights come from, dtypes, generation defaults and
built-in LoRAs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from Wan2GP.errors import UnknownModel, UnsupportedTaskType, WeightsNotFound
from Wan2GP.loras import LORA_PRESETS

MODELS_DIR = Path(__file__).parent / "models"
Family = Literal["t2v", "i2v", "flf2v", "vace", "flux", "flux_kontext"]
FAMILIES: tuple[str, ...] = ("t2v", "i2v", "flf2v", "vace", "flux", "flux_kontext")
VIDEO_FAMILIES = frozenset({"t2v", "i2v", "flf2v", "vace"})

# Task type -> family. ``single_image`` and ``generate_video`` are routed by the model's family at run time.
TASK_FAMILIES: dict[str, str] = {
    "t2v": "t2v",
    "t2v_22": "t2v",
    "i2v": "i2v",
    "i2v_22": "i2v",
    "flf2v": "flf2v",
    "vace": "vace",
    "vace_21": "vace",
    "vace_22": "vace",
    "flux": "flux",
    "magic_edit": "flux_kontext",
    "single_image": "single_image",
    "generate_video": "generate_video",
}
# Which model families can run a task family. i2v and flf2v share WanImageToVideoPipeline but not the
# transformer: only FLF2V models embed a last frame, and they always expect one.
COMPATIBLE_FAMILIES: dict[str, frozenset[str]] = {
    "t2v": frozenset({"t2v"}),
    "i2v": frozenset({"i2v"}),
    "flf2v": frozenset({"flf2v"}),
    "vace": frozenset({"vace"}),
    "flux": frozenset({"flux"}),
    "flux_kontext": frozenset({"flux_kontext"}),
    "single_image": frozenset({"t2v", "vace", "flux"}),
    "generate_video": frozenset(FAMILIES),
}


class Defaults(BaseModel):
    """Generation defaults of a model; task params override them."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int = Field(30, ge=1, le=200)
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0)
    flow_shift: float | None = Field(None, gt=0.0, le=100.0)
    width: int = Field(832, ge=8, le=4096)
    height: int = Field(480, ge=8, le=4096)
    fps: int = Field(16, ge=1, le=120)
    frames: int = Field(81, ge=1, le=1025)
    max_sequence_length: int = Field(512, ge=8, le=4096)
    negative_prompt: str = ""
    sample_solver: str | None = None
    # Denoising phases, as the original's model definitions give them: phase 1 runs while the timestep is
    # >= switch_threshold, phase 2 until switch_threshold2, phase 3 after. Phases 1..model_switch_phase run
    # on the high-noise expert (``transformer``) of a two-expert Wan 2.2 model, later ones on
    # ``transformer_2``. Each phase has its own guidance (guidance_scale, guidance2_scale, guidance3_scale).
    guidance_phases: int = Field(1, ge=1, le=3)
    guidance2_scale: float | None = Field(None, ge=0.0, le=50.0)
    guidance3_scale: float | None = Field(None, ge=0.0, le=50.0)
    switch_threshold: float | None = Field(None, ge=0.0, le=1000.0)
    switch_threshold2: float | None = Field(None, ge=0.0, le=1000.0)
    model_switch_phase: int = Field(1, ge=1, le=2)


class LoraSpec(BaseModel):
    """A LoRA file (path, or name in the LoRA folder) with its multiplier."""

    model_config = ConfigDict(extra="forbid")

    file: str
    multiplier: float = 1.0
    preset: str | None = None  # the flag this built-in LoRA stands for ("causvid", "lighti2x", "in_scene")


class LoraPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    multiplier: float = 1.0
    settings: dict[str, float | int] = Field(default_factory=dict)


class ModelDefinition(BaseModel):
    """One model of the catalog (the content of one ``models/*.json`` file)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    family: Family
    pipeline: str  # diffusers pipeline class name, e.g. "WanPipeline"
    source: str  # Hugging Face repo id, local folder, or "tiny:<name>"
    description: str = ""
    aliases: list[str] = Field(default_factory=list)
    default: bool = False  # the catalog's default model of its family
    # Task types this model is the catalog's default for (the original's task-type defaults, e.g. t2v_22).
    default_for: list[str] = Field(default_factory=list)
    last_frame: bool = False  # an i2v model that also takes image_end (Wan 2.2 I2V); flf2v models always do
    dtype: str = "bfloat16"
    component_dtypes: dict[str, str] = Field(default_factory=dict)
    # Component name -> share key. Two models whose component has the same key (and dtype) hold the same
    # weights, so switching between them keeps the loaded module instead of reading it again.
    shared: dict[str, str] = Field(default_factory=dict)
    size_multiple: int = Field(16, ge=1)
    max_images: int = Field(8, ge=1)  # flux: most images one task may ask for
    defaults: Defaults = Field(default_factory=Defaults)
    loras: list[LoraSpec] = Field(default_factory=list)
    lora_presets: dict[str, LoraPreset] = Field(default_factory=dict)

    @field_validator("pipeline")
    @classmethod
    def _known_pipeline(cls, value: str) -> str:
        import diffusers

        if not hasattr(diffusers, value):
            raise ValueError(f"diffusers has no pipeline class {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        torch_dtype(value)
        return value

    @field_validator("component_dtypes")
    @classmethod
    def _known_dtypes(cls, value: dict[str, str]) -> dict[str, str]:
        for dtype in value.values():
            torch_dtype(dtype)
        return value

    def preset(self, name: str) -> LoraPreset:
        """The LoRA preset ``name``: the model's own, else the global one."""
        if name in self.lora_presets:
            return self.lora_presets[name]
        return LoraPreset(**LORA_PRESETS[name])

    def builtin_lora(self, preset: str) -> LoraSpec | None:
        return next((lora for lora in self.loras if lora.preset == preset), None)


def torch_dtype(name: str):
    """Map "bfloat16" / "float16" / "float32" to the torch dtype."""
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def family_of_task_type(task_type: str, model_id: str | None = None, catalog: Catalog | None = None) -> str:
    """The family that runs ``task_type``: t2v, i2v, flf2v, vace, flux, flux_kontext or single_image.

    ``generate_video`` routes by its model's family: give ``model_id`` (and a catalog, default the shipped
    one); without a model it falls back to t2v, the family of the default video model.
    """
    if task_type not in TASK_FAMILIES:
        raise UnsupportedTaskType(
            f"task_type {task_type!r} is not generated by this engine; supported: {', '.join(TASK_FAMILIES)}"
        )
    family = TASK_FAMILIES[task_type]
    if family == "generate_video":
        if model_id is None:
            return "t2v"
        return (catalog or Catalog.load()).get(model_id).family
    return family


class Catalog:
    """All model definitions, by id and alias."""

    def __init__(self, definitions: list[ModelDefinition], tiny_dir: Path | None = None):
        self._models: dict[str, ModelDefinition] = {}
        self._aliases: dict[str, str] = {}
        self.tiny_dir = tiny_dir
        for definition in definitions:
            self.add(definition)

    @classmethod
    def load(cls, models_dir: str | Path | None = None, tiny_dir: str | Path | None = None) -> Catalog:
        """Read the shipped definitions, then ``models_dir`` (default ``$HWGP_MODELS_DIR``) on top."""
        folders = [MODELS_DIR]
        extra = models_dir if models_dir is not None else os.environ.get("HWGP_MODELS_DIR")
        if extra:
            if not Path(extra).is_dir():
                raise FileNotFoundError(f"models_dir {extra} is not a folder")
            folders.append(Path(extra))
        definitions = []
        for folder in folders:
            for path in sorted(Path(folder).glob("*.json")):
                definitions.append(load_definition(path))
        return cls(definitions, Path(tiny_dir) if tiny_dir is not None else None)

    def add(self, definition: ModelDefinition) -> None:
        """Register (or replace) a definition."""
        old = self._models.get(definition.id)
        if old is not None:
            for alias in old.aliases:
                self._aliases.pop(alias, None)
        self._models[definition.id] = definition
        for alias in definition.aliases:
            self._aliases[alias] = definition.id

    def ids(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models or model_id in self._aliases

    def get(self, model_id: str) -> ModelDefinition:
        """The definition of ``model_id`` (an id or an alias)."""
        key = self._aliases.get(model_id, model_id)
        if key not in self._models:
            raise UnknownModel(f"model {model_id!r} is not in the catalog; known: {', '.join(self.ids())}")
        return self._models[key]

    def default_for(self, family: str) -> ModelDefinition:
        """The catalog's default model of ``family`` (the one marked ``default``, else the first by id)."""
        candidates = [d for d in self._models.values() if d.family == family]
        if not candidates:
            raise UnknownModel(f"the catalog has no model of family {family!r}")
        marked = [d for d in candidates if d.default]
        return (marked or sorted(candidates, key=lambda d: d.id))[0]

    def default_for_task_type(self, task_type: str) -> ModelDefinition | None:
        """The model whose definition names ``task_type`` in ``default_for`` (e.g. t2v_22), if any."""
        return next(
            (d for d in sorted(self._models.values(), key=lambda d: d.id) if task_type in d.default_for), None
        )

    def resolve_source(self, source: str) -> Path:
        """The local folder holding ``source``'s weights in diffusers format.

        Looks, in order: ``tiny:<name>`` (built on demand), an existing local folder, ``$WAN2GP_CACHE``
        (``<cache>/<org>/<name>`` or ``<cache>/<name>``), then the Hugging Face cache. Downloads only when
        ``$HWGP_ALLOW_DOWNLOAD=1``: the engine never fetches weights on its own otherwise.
        """
        if source.startswith("tiny:"):
            from Wan2GP.tiny import TINY_MODELS, ensure_tiny_models

            name = source.removeprefix("tiny:")
            if name not in TINY_MODELS:
                raise WeightsNotFound(f"no tiny model {name!r}; tiny models: {', '.join(TINY_MODELS)}")
            return ensure_tiny_models(self.tiny_dir) / name
        local = Path(source).expanduser()
        if local.is_dir():
            return local.resolve()
        cache = os.environ.get("WAN2GP_CACHE")
        if cache:
            for candidate in (Path(cache) / source, Path(cache) / source.split("/")[-1]):
                if (candidate / "model_index.json").is_file():
                    return candidate.resolve()
        return _hf_snapshot(source)


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    allow_download = os.environ.get("HWGP_ALLOW_DOWNLOAD") == "1" and os.environ.get("HF_HUB_OFFLINE") != "1"
    try:
        # Diffusers-format folders only: several repos also hold single-file checkpoints we never use.
        path = snapshot_download(
            repo_id, allow_patterns=["model_index.json", "*/*"], local_files_only=not allow_download
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
        raise WeightsNotFound(
            f"weights {repo_id!r} are not a local folder, not under $WAN2GP_CACHE and not in the Hugging Face "
            f"cache (set HWGP_ALLOW_DOWNLOAD=1 to download them): {error}"
        ) from error
    return Path(path)


def load_definition(path: str | Path) -> ModelDefinition:
    """Read one JSON definition; errors name the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"model definition {path}: invalid JSON: {error}") from error
    try:
        return ModelDefinition.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"model definition {path}: {error}") from error
