"""How a generation splits across ranks, without torch: the modes, each one's degrees on a number of ranks,
and the NCCL switches every rank sets. Imported by what only plans or checks a split (the config, a
multi-GPU replica's coordinator), so those processes need not load torch; :mod:`Wan2GP.parallel` runs it."""

from __future__ import annotations

__all__ = ["MODES", "NCCL_SAFE_ENV", "plan_degrees"]

MODES = ("cfg", "ulysses", "cfg+ulysses")

# NVLink multicast (NVLS) must stay off on these machines: NCCL, torch symmetric memory and NVSHMEM.
NCCL_SAFE_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def plan_degrees(mode: str, world_size: int) -> tuple[int, int]:
    """``(cfg_degree, ulysses_degree)`` for ``mode`` on ``world_size`` ranks; a clear error when it can't split."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "cfg":
        if world_size != 2:
            raise ValueError(f"mode 'cfg' needs exactly 2 ranks (cond, uncond), got world_size={world_size}")
        return 2, 1
    if mode == "ulysses":
        if world_size < 2:
            raise ValueError(f"mode 'ulysses' needs at least 2 ranks, got world_size={world_size}")
        return 1, world_size
    if world_size < 4 or world_size % 2:
        raise ValueError(f"mode 'cfg+ulysses' needs an even world_size >= 4, got {world_size}")
    return 2, world_size // 2
