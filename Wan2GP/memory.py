"""Memory profiles: where a loaded pipeline's weights live between and during denoising steps.

- ``resident``: every component on the device (fastest, most memory).
- ``model_offload``: components live on the CPU and move to the device one model at a time
  (diffusers ``enable_model_cpu_offload``).
- ``group_offload``: blocks of layers move to the device as they run (diffusers ``enable_group_offload``),
  the smallest footprint on the device.
- ``cpu``: everything on the CPU, whatever the device.
Without an accelerator the offload profiles have nothing to offload to and keep the pipeline on the CPU.
"""

from __future__ import annotations

import torch

PROFILES = ("resident", "model_offload", "group_offload", "cpu")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"memory_profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    return profile


def _group_offload_enabled(module: torch.nn.Module) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(module)


def apply_memory_profile(pipe, profile: str, device: str) -> None:
    """Place ``pipe``'s components according to ``profile`` on ``device``."""
    check_profile(profile)
    on_accelerator = torch.device(device).type != "cpu"
    if profile == "cpu" or (profile != "resident" and not on_accelerator):
        pipe.to("cpu")
    elif profile == "resident":
        pipe.to(device)
    elif profile == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        # Components reused from the previous model keep their hooks: applying them twice is an error.
        already = [
            name
            for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) and _group_offload_enabled(module)
        ]
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=torch.device(device).type == "cuda",
            exclude_modules=already,
        )


def release_for_reuse(pipe, profile: str) -> None:
    """Detach ``pipe``'s model-offload hooks so its components can join another pipeline."""
    if profile == "model_offload":
        pipe.remove_all_hooks()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def pipeline_bytes(pipe) -> int:
    """Bytes of all the pipeline's weights, wherever they are."""
    return sum(module_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))


def device_memory_bytes(device: str) -> int | None:
    """Bytes currently allocated on an accelerator (None on CPU)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(torch.device(device)))
    return None
