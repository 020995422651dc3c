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

from Wan2GP.errors import WeightsNotFound

LORA_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoraRequest:
    path: Path
    multiplier: float


def default_lora_dirs() -> list[Path]:
    """``$HWGP_LORA_DIR`` (may list several folders, separated by ``os.pathsep``), then ``$WAN2GP_CACHE/loras``."""
    dirs = [Path(p) for p in os.environ.get("HWGP_LORA_DIR", "").split(os.pathsep) if p]
    if os.environ.get("WAN2GP_CACHE"):
        dirs.append(Path(os.environ["WAN2GP_CACHE"]) / "loras")
    return dirs


def resolve_lora(name: str, search_dirs: list[Path]) -> Path:
    """A LoRA file from a path, or a name (with or without suffix) in one of ``search_dirs``."""
    if re.match(r"^[a-z]+://", name):
        raise WeightsNotFound(
            f"LoRA {name!r} is a URL: download it with storage first, then pass the local path"
        )
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    for folder in search_dirs:
        for suffix in ("", *LORA_SUFFIXES):
            path = Path(folder) / f"{name}{suffix}"
            if path.is_file():
                return path.resolve()
    searched = ", ".join(str(d) for d in search_dirs) or "no LoRA folder configured (set HWGP_LORA_DIR)"
    raise WeightsNotFound(f"LoRA {name!r} not found (looked in: {searched})")


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

    for name, request in wanted.items():
        if name not in state:
            pipe.load_lora_weights(str(request.path), adapter_name=name)
            state[name] = str(request.path)
    if wanted:
        pipe.set_adapters(list(wanted), [r.multiplier for r in wanted.values()])
    return [{"file": str(r.path), "multiplier": r.multiplier} for r in wanted.values()]
