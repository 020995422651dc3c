"""LoRA handling: find LoRA files, load them as adapters, set multipliers, and drop what the next task
does not use, so one task's LoRAs never leak into the next.

Adapters stay loaded while consecutive tasks use them (loading is the slow part); the set of loaded
adapters is recorded on the transformer module itself, so it follows the module when a model switch keeps
the transformer.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from Wan2GP.errors import WeightsNotFound
from Wan2GP.phases import Multiplier

LORA_SUFFIX = ".safetensors"  # the only format loaded: no pickle (.pt / .bin / .ckpt) from task input
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".gguf", ".sft")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)

# LoRAs that task flags switch on, with the settings they imply (docs/compatibility.md). A model JSON may
# override a preset in its own ``lora_presets``; a LoRA listed in the model's ``loras`` keeps the JSON's
# defaults.
LORA_PRESETS: dict[str, dict] = {
    "causvid": {
        "file": "Wan21_CausVid_14B_T2V_lora_rank32.safetensors",
        "multiplier": 1.0,
        "settings": {"num_inference_steps": 9, "guidance_scale": 1.0, "flow_shift": 1.0},
    },
    "lighti2x": {
        "file": "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
        "multiplier": 1.0,
        "settings": {"num_inference_steps": 6, "guidance_scale": 1.0, "flow_shift": 5.0},
    },
    "in_scene": {"file": "InScene-v1.0.safetensors", "multiplier": 1.0, "settings": {}},
}


class LoraRefused(WeightsNotFound):  # noqa: N818 - a WeightsNotFound, so callers fail the task the same way
    """A LoRA name that is not a ``.safetensors`` file inside the configured LoRA folders."""


@dataclass(frozen=True)
class LoraRequest:
    path: Path
    multiplier: Multiplier  # one value, or one per denoising phase / step (see Wan2GP.phases)
    name: str = ""  # the file as its folder names it (what metadata reports: no server paths)


def default_lora_dirs() -> list[Path]:
    """``$HWGP_LORA_DIR`` (may list several folders, separated by ``os.pathsep``), then ``$WAN2GP_CACHE/loras``."""
    dirs = [Path(p) for p in os.environ.get("HWGP_LORA_DIR", "").split(os.pathsep) if p]
    if os.environ.get("WAN2GP_CACHE"):
        dirs.append(Path(os.environ["WAN2GP_CACHE"]) / "loras")
    return dirs


def is_lora_url(name: str) -> bool:
    return bool(_URL.match(name))


def check_lora_name(name: str) -> str:
    """The file name ``name`` stands for (``.safetensors`` added when it has no suffix).

    Raises LoraRefused for a URL, an absolute path, a '..' component or another suffix. The message
    depends only on the name, never on the file system, so it tells nothing about which files exist.
    """
    if not isinstance(name, str) or not name.strip():
        raise LoraRefused("a LoRA name must be a non-empty string")
    if is_lora_url(name):
        raise LoraRefused(
            f"LoRA {name!r} is a URL: it must be fetched into the LoRA cache before the task runs"
        )
    path = Path(name)
    if path.is_absolute() or name.startswith("~") or ".." in path.parts or "\\" in name:
        raise LoraRefused(
            f"LoRA {name!r}: LoRAs are named by their file inside the LoRA folders; "
            "absolute paths, '~' and '..' are refused"
        )
    suffix = path.suffix.lower()
    if suffix == LORA_SUFFIX:
        return name
    if suffix in _PICKLE_SUFFIXES:
        raise LoraRefused(f"LoRA {name!r}: only {LORA_SUFFIX} files are loaded")
    return f"{name}{LORA_SUFFIX}"


def resolve_lora(name: str, search_dirs: list[Path]) -> LoraRequest:
    """The LoRA file ``name`` (multiplier 1.0) from the first of ``search_dirs`` holding it.

    The file must be inside that folder after resolving symlinks: a link pointing elsewhere counts as
    missing. The error names neither the folders nor what exists.
    """
    file_name = check_lora_name(name)
    for folder in search_dirs:
        root = Path(folder).resolve()
        path = (root / file_name).resolve()
        if path.is_relative_to(root) and path.is_file():
            return LoraRequest(path=path, multiplier=Multiplier.constant(1.0), name=file_name)
    raise LoraRefused(f"LoRA {name!r} is not in the LoRA folders")


def lora_names_of(params: dict) -> list[tuple[str, str]]:
    """(field, name) of every LoRA a task's params name, in every field the original reads them from."""
    names: list[tuple[str, str]] = []
    for field in ("activated_loras", "lora_names"):
        value = params.get(field)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple):
            names += [(field, v) for v in value if isinstance(v, str)]
    additional = params.get("additional_loras")
    if isinstance(additional, dict):
        names += [("additional_loras", k) for k in additional]
    elif isinstance(additional, list | tuple):
        names += [("additional_loras", v) for v in additional if isinstance(v, str)]
    loras = params.get("loras")  # the image models' [{path, scale}] list
    if isinstance(loras, list):
        names += [(f"loras.{i}.path", v["path"]) for i, v in enumerate(loras)
                  if isinstance(v, dict) and isinstance(v.get("path"), str)]  # fmt: skip
    phase_config = params.get("phase_config")
    if isinstance(phase_config, dict) and isinstance(phase_config.get("phases"), list):
        for i, phase in enumerate(phase_config["phases"]):
            for lora in phase.get("loras", []) if isinstance(phase, dict) else []:
                if isinstance(lora, dict) and isinstance(lora.get("url"), str) and lora["url"].strip():
                    names.append((f"phase_config.phases.{i}.loras", lora["url"]))
    return names


def validate_loras(params: dict, search_dirs: list[Path] | None = None) -> list[str]:
    """Check every LoRA a task names before it is queued (the API calls this at POST time).

    Local names must pass :func:`check_lora_name` and, when ``search_dirs`` is given, exist inside one of
    them. URLs are returned (for the guarded fetcher to fetch, or for the caller to refuse when downloads
    are off), not checked here. Raises LoraRefused whose message starts with the field.
    """
    urls = []
    for field, name in lora_names_of(params):
        if is_lora_url(name):
            urls.append(name)
            continue
        try:
            if search_dirs is None:
                check_lora_name(name)
            else:
                resolve_lora(name, search_dirs)
        except LoraRefused as error:
            raise LoraRefused(f"{field}: {error}") from None
    return urls


def replace_lora_urls(params: dict, fetched: dict[str, str]) -> dict:
    """A copy of ``params`` with each LoRA URL replaced by the file name ``fetched`` maps it to.

    How LoRAs by URL plug in: the fetcher downloads each URL of :func:`validate_loras` into a folder that
    is one of the engine's LoRA folders (content-addressed, e.g. ``<sha256>.safetensors``), then the task
    runs on ``replace_lora_urls(params, {url: file_name})``: the engine resolves those names like any other.
    """

    def swap(name: Any) -> Any:
        return fetched.get(name, name) if isinstance(name, str) else name

    out = dict(params)
    for field in ("activated_loras", "lora_names"):
        value = out.get(field)
        if isinstance(value, str):
            out[field] = ",".join(swap(v.strip()) for v in value.split(","))
        elif isinstance(value, list | tuple):
            out[field] = [swap(v) for v in value]
    additional = out.get("additional_loras")
    if isinstance(additional, dict):
        out["additional_loras"] = {swap(k): v for k, v in additional.items()}
    elif isinstance(additional, list | tuple):
        out["additional_loras"] = [swap(v) for v in additional]
    loras = out.get("loras")  # the image models' [{path, scale}] list
    if isinstance(loras, list):
        out["loras"] = [{**v, "path": swap(v.get("path"))} if isinstance(v, dict) else v for v in loras]
    phase_config = out.get("phase_config")
    if isinstance(phase_config, dict) and isinstance(phase_config.get("phases"), list):
        phases = []
        for phase in phase_config["phases"]:
            if isinstance(phase, dict) and isinstance(phase.get("loras"), list):
                loras = [{**lora, "url": swap(lora.get("url"))} if isinstance(lora, dict) else lora
                         for lora in phase["loras"]]  # fmt: skip
                phase = {**phase, "loras": loras}
            phases.append(phase)
        out["phase_config"] = {**phase_config, "phases": phases}
    return out


def adapter_name(path: Path) -> str:
    """A peft-safe adapter name, unique per file."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", path.stem)[:40]
    return f"{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _state(pipe) -> dict[str, str]:
    """adapter name -> file path of the adapters loaded into ``pipe.transformer``."""
    transformer = pipe.transformer
    if not hasattr(transformer, "_hwgp_loras"):
        transformer._hwgp_loras = {}
    return transformer._hwgp_loras


def loaded_loras(pipe) -> dict[str, str]:
    return dict(_state(pipe))


def apply_loras(pipe, requests: list[LoraRequest]) -> list[dict]:
    """Make exactly ``requests`` active on ``pipe`` (an empty list removes every LoRA)."""
    state = _state(pipe)
    wanted: dict[str, LoraRequest] = {}
    for request in requests:  # the same file twice: the later multiplier wins
        wanted[adapter_name(request.path)] = request

    stale = [name for name in state if name not in wanted]
    if stale and not wanted:
        # Unfuse and unwrap completely: the model is bit-for-bit the base model again.
        pipe.unload_lora_weights()
        state.clear()
    elif stale:
        pipe.delete_adapters(stale)
        for name in stale:
            del state[name]

    two_experts = getattr(pipe, "transformer_2", None) is not None
    for name, request in wanted.items():
        if name not in state:
            pipe.load_lora_weights(str(request.path), adapter_name=name)
            if two_experts:  # the original applies a LoRA to both experts, with per-phase multipliers
                pipe.load_lora_weights(str(request.path), adapter_name=name, load_into_transformer_2=True)
            state[name] = str(request.path)
    if wanted:
        pipe.set_adapters(list(wanted), [r.multiplier.first() for r in wanted.values()])
    return [{"file": r.name or r.path.name, "multiplier": r.multiplier.describe()} for r in wanted.values()]
