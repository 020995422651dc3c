"""Speed on one GPU: compiled transformer blocks, the attention backend, and step caching.

Applied by the engine to a loaded pipeline's transformer(s) (``transformer`` and, for Wan 2.2,
``transformer_2``):

- **compile** (:func:`compile_transformers`): regional ``torch.compile`` of the repeated transformer blocks
  (diffusers' ``compile_repeated_blocks(fullgraph=True)``: one compiled block serves all 30 of them, so a new
  shape compiles in seconds, not minutes). Inductor's artefacts stay on disk (``$TORCHINDUCTOR_CACHE_DIR``,
  default ``~/.cache/hwgp/inductor``), so a restarted replica of the same node reuses them. Computes the same
  function as eager up to bf16 rounding (fused kernels round differently). Resident memory profile only.
- **attention backend** (:func:`set_attention_backend`): diffusers' attention dispatcher (``native``,
  ``_native_cudnn``, ``_native_flash``, ``flash`` when flash-attn is installed, ...); the one used is
  recorded in each result.
- **text-embedding cache** (:class:`PromptCache`): the pipeline's ``encode_prompt`` remembers its embeddings
  per (model, text encoder, prompt, negative prompt, max length, ...) in a bounded LRU, so a repeated prompt
  skips the text encoder (UMT5-XXL for Wan: seconds per task). Cleared when the engine switches model; each
  result reports its hits and misses (``acceleration.text_encode_cache``).
- **step caching** (:func:`step_cache`): the original's task params ``skip_steps_cache_type``,
  ``skip_steps_multiplier`` and ``skip_steps_start_step_perc`` mapped onto diffusers' MagCache hooks:
  ``"mag"`` skips whole transformer forwards (reusing the last residual) where the calibrated magnitude ratios
  say the output barely changes. The threshold is solved from the model's ratios so the skipped share meets
  the asked multiplier (``steps / full forwards``); the first ``start_step_perc`` % of steps always run.
  Ratios come from a calibration run per model (:func:`calibrate_mag_ratios`, ``python -m
  Wan2GP.acceleration calibrate``), kept under ``$HWGP_CACHE_DIR/mag_ratios``. ``"tea"`` (TeaCache) has no
  diffusers implementation and is refused with that reason. Every result reports its forwards and skips.
  On a compiled engine the blocks' own forwards stay compiled under the cache hooks
  (:func:`compiled_under_hooks`).
- **VAE decode** (:func:`vae_tiling`, :func:`channels_last_convolutions`): the Wan VAE's 3-D convolution
  weights in ``channels_last_3d`` on CUDA (cuDNN's faster kernels: 2.78 -> 2.61 s and 9.6 -> 8.5 GiB at
  832x480x81 on an H200), and tiled decoding only when the decode's estimated peak does not fit in the free
  device memory (tiling costs time and seams; an H200 decodes 720p whole in 21.5 GiB). Each result records
  whether it tiled (``acceleration.vae_tiling``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "AccelerationConfig",
    "PromptCache",
    "StepCache",
    "StepCacheReport",
    "apply_acceleration",
    "calibrate_mag_ratios",
    "compile_transformers",
    "load_mag_ratios",
    "mag_threshold",
    "parse_step_cache",
    "save_mag_ratios",
    "set_attention_backend",
    "step_cache",
    "vae_tiling",
]

CACHE_TYPES = ("mag",)  # what skip_steps_cache_type accepts besides "" / None (off)
TRANSFORMERS = ("transformer", "transformer_2")


# A TORCHINDUCTOR_CACHE_DIR given to the process (inductor sets the variable itself once it has run).
_GIVEN_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def cache_root() -> Path:
    return Path(os.environ.get("HWGP_CACHE_DIR") or Path.home() / ".cache" / "hwgp")


# ----------------------------------------------------------------------------------------------------------
# Compile and attention backend: the same function, faster
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AccelerationConfig:
    """What an engine applies to every pipeline it loads.

    Args:
        compile: regional torch.compile of the transformer blocks (resident memory profile only); ``"auto"``:
            on a CUDA device with the resident profile, off elsewhere (compiling costs more than it saves on a
            CPU, and offloading hooks move weights during the compiled forward).
        attention_backend: a diffusers attention backend name (None: diffusers' default, ``native``);
            ``"auto"``: at each load, time the model's self-attention at its default size under every backend
            installed here and keep the fastest exact one (:func:`choose_attention_backend`).
        inductor_cache_dir: where compiled artefacts live (default ``$TORCHINDUCTOR_CACHE_DIR`` or
            ``$HWGP_CACHE_DIR/inductor``).
        vae_tiling: tile the Wan VAE decode; ``"auto"``: only when its estimated peak exceeds the free device
            memory (never on a CPU).
        vae_channels_last: the Wan VAE's 3-D convolutions in channels-last layout; ``"auto"``: on CUDA.
    """

    compile: bool | str = False
    attention_backend: str | None = None
    inductor_cache_dir: str | None = None
    vae_tiling: bool | str = "auto"
    vae_channels_last: bool | str = "auto"

    def check(self, memory_profile: str, device: str | None = None) -> AccelerationConfig:
        """This config with ``compile="auto"`` and ``vae_channels_last="auto"`` decided for ``device``; a
        ValueError naming the field for a setting that cannot run."""
        for name in ("vae_tiling", "vae_channels_last"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"{name}: must be true, false or 'auto', got {getattr(self, name)!r}")
        if self.vae_channels_last == "auto":
            on_gpu = device is not None and device.startswith("cuda")
            return replace(self, vae_channels_last=on_gpu).check(memory_profile, device)
        if self.compile == "auto":
            on_gpu = device is not None and device.startswith("cuda")
            return replace(self, compile=on_gpu and memory_profile == "resident").check(
                memory_profile, device
            )
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be true, false or 'auto', got {self.compile!r}")
        if self.compile and memory_profile != "resident":
            raise ValueError(
                f"compile: needs memory_profile 'resident' (offloading hooks move weights during the compiled "
                f"forward), got {memory_profile!r}"
            )
        if self.attention_backend is not None:
            check_attention_backend(self.attention_backend)
        return self


def attention_backends() -> list[str]:
    """The names diffusers' attention dispatcher knows (its registry), whether or not installed here."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def check_attention_backend(name: str) -> str:
    """``name`` when diffusers knows it (or ``"auto"``); a ValueError naming the field and the known names
    otherwise."""
    known = attention_backends()
    if name != "auto" and name not in known:
        raise ValueError(f"attention_backend: {name!r} is not one of auto, {', '.join(known)}")
    return name


# Tried by attention_backend "auto", in this order; the first is the reference for exactness. Approximate
# kernels (SageAttention's int8 attention) are left out: a user names them explicitly.
GPU_ATTENTION_CANDIDATES = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "flash",
    "_flash_3",
)
CPU_ATTENTION_CANDIDATES = ("native", "_native_math")
# A backend whose output is within this relative error of native's computes the same function (bf16 kernels
# differ by ~5e-3 on an H200).
EXACT_ATTENTION_ERROR = 1e-2
CPU_ATTENTION_TOKENS = 2048  # a CPU times a smaller problem (the choice there is a smoke check)


def attention_tokens(family: str, width: int, height: int, frames: int, text_tokens: int = 512) -> int:
    """The sequence length of a transformer's self-attention at this size (VAE 8x, patch 2x2; Wan: 4x in time)."""
    spatial = (height // 16) * (width // 16)
    if family == "flux":
        return spatial + text_tokens  # joint attention over image and text tokens
    return ((max(frames, 1) - 1) // 4 + 1) * spatial


def choose_attention_backend(
    transformer: torch.nn.Module, tokens: int, repeats: int = 3, exact_error: float = EXACT_ATTENTION_ERROR
) -> dict[str, Any]:
    """Time the transformer's self-attention (its heads and head size, ``tokens`` long, its dtype, its device)
    under each candidate backend installed here; the fastest whose output matches ``native``'s within
    ``exact_error`` (relative), else ``native``. Returns ``{"backend", "timings_ms", "unavailable", "tokens"}``."""
    from diffusers.models.attention_dispatch import (
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    # The dtype most of its weights have (a few modules stay float32 in a bf16 transformer).
    dtype = Counter(p.dtype for p in transformer.parameters()).most_common(1)[0][0]
    device = next(transformer.parameters()).device
    on_gpu = device.type == "cuda"
    if not on_gpu:
        tokens = min(tokens, CPU_ATTENTION_TOKENS)
    config = transformer.config
    generator = torch.Generator("cpu").manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, config.num_attention_heads, config.attention_head_dim, generator=generator).to(
            device, dtype
        )
        for _ in range(3)
    )
    known = set(attention_backends())
    timings: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    reference = None
    for name in GPU_ATTENTION_CANDIDATES if on_gpu else CPU_ATTENTION_CANDIDATES:
        if name not in known:
            continue
        try:
            from diffusers.models.attention_dispatch import AttentionBackendName

            _check_attention_backend_requirements(AttentionBackendName(name))
            with torch.no_grad():
                out = dispatch_attention_fn(q, k, v, backend=name)  # warm: kernel choice, workspace
                if on_gpu:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    out = dispatch_attention_fn(q, k, v, backend=name)
                if on_gpu:
                    torch.cuda.synchronize(device)
        except Exception as error:  # not installed, or not for this GPU / dtype / head size
            unavailable[name] = f"{type(error).__name__}: {str(error)[:120]}"
            continue
        seconds = (time.perf_counter() - start) / repeats
        out = out.float()
        if reference is None:
            reference = out
        error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
        if error > exact_error:
            unavailable[name] = f"not exact: relative error {error:.1e} vs native"
            continue
        timings[name] = round(seconds * 1000, 3)
    best = min(timings, key=timings.__getitem__) if timings else "native"
    return {"backend": best, "timings_ms": timings, "unavailable": unavailable, "tokens": tokens}


def use_inductor_cache_dir(path: str | None = None) -> str:
    """Point inductor's on-disk cache at ``path`` (or keep ``$TORCHINDUCTOR_CACHE_DIR``); returns the folder."""
    folder = path or _GIVEN_INDUCTOR_DIR or str(cache_root() / "inductor")
    Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def _transformers(pipe) -> list[tuple[str, torch.nn.Module]]:
    return [(name, getattr(pipe, name)) for name in TRANSFORMERS if getattr(pipe, name, None) is not None]


def compile_transformers(pipe, cache_dir: str | None = None) -> list[str]:
    """Compile the repeated blocks of each transformer of ``pipe`` (once; lazily, at the first forward)."""
    use_inductor_cache_dir(cache_dir)
    compiled = []
    for name, transformer in _transformers(pipe):
        if getattr(transformer, "_hwgp_compiled", False):
            compiled.append(name)
            continue
        if not getattr(transformer, "_repeated_blocks", None):
            raise ValueError(f"compile: {type(transformer).__name__} declares no repeated blocks to compile")
        transformer.compile_repeated_blocks(fullgraph=True)
        transformer._hwgp_compiled = True
        compiled.append(name)
    return compiled


def set_attention_backend(pipe, backend: str) -> str:
    """Route every attention call of the pipeline's transformer(s) through ``backend``; returns it."""
    for _, transformer in _transformers(pipe):
        transformer.set_attention_backend(backend)
    return backend


def apply_acceleration(pipe, config: AccelerationConfig, attention_size: int | None = None) -> dict[str, Any]:
    """Apply ``config`` to a freshly loaded ``pipe``; what was applied (recorded in each task's result).
    ``attention_size``: the self-attention length that ``attention_backend: auto`` times (the model's default
    size, :func:`attention_tokens`)."""
    applied: dict[str, Any] = {"compiled": [], "attention_backend": "native"}
    backend = config.attention_backend
    transformers = _transformers(pipe)
    if backend == "auto" and transformers and attention_size:
        choice = choose_attention_backend(transformers[0][1], attention_size)
        applied["attention_choice"] = choice
        logger.info("attention_backend auto: %s of %s", choice["backend"], choice["timings_ms"])
        backend = choice["backend"]
    elif backend == "auto":
        backend = None  # nothing to time (no transformer): diffusers' default
    if backend is not None:
        applied["attention_backend"] = set_attention_backend(pipe, backend)
    if config.compile:
        applied["compiled"] = compile_transformers(pipe, config.inductor_cache_dir)
        applied["inductor_cache_dir"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    if config.vae_channels_last is True and _wan_vae(pipe) is not None:
        applied["vae_channels_last"] = channels_last_convolutions(pipe.vae)
    return applied


# ----------------------------------------------------------------------------------------------------------
# VAE decode: channels-last convolutions, tiling only when memory needs it
# ----------------------------------------------------------------------------------------------------------

# Peak device bytes of a float32 Wan-VAE decode per output pixel (width x height x frames), measured on an H200
# (bench/gpu_probes.py): 9.6 GiB at 832x480x81 and 21.5 GiB at 1280x720x81, ~310-320 B; bf16 about half.
VAE_DECODE_BYTES_PER_PIXEL = 330
VAE_MEMORY_MARGIN = 0.9  # of the free memory, for the allocator's fragmentation


def _wan_vae(pipe):
    vae = getattr(pipe, "vae", None)
    return vae if type(vae).__name__ == "AutoencoderKLWan" else None


def channels_last_convolutions(
    vae: torch.nn.Module, memory_format: torch.memory_format = torch.channels_last_3d
) -> bool:
    """The 3-D convolution weights of ``vae`` in ``memory_format`` (the only rank-5 parameters, so the
    module's own ``.to(memory_format=...)`` cannot do it); whether any was converted."""
    converted = False
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
            converted = True
    return converted


def vae_decode_bytes(width: int, height: int, frames: int, dtype: torch.dtype) -> int:
    """Estimated peak device memory of a whole (untiled) Wan-VAE decode."""
    scale = 1.0 if dtype == torch.float32 else 0.5
    return int(VAE_DECODE_BYTES_PER_PIXEL * scale * width * height * max(frames, 1))


def free_device_bytes(device: str | torch.device) -> int | None:
    """What a CUDA device can still hand out: free memory plus what the caching allocator holds unused. None
    on a CPU (host memory is not what limits a decode there)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def needs_vae_tiling(
    width: int, height: int, frames: int, dtype: torch.dtype, free_bytes: int | None
) -> bool:
    """Whether a whole decode would not fit in ``free_bytes`` (None: no device limit, never)."""
    if free_bytes is None:
        return False
    return vae_decode_bytes(width, height, frames, dtype) > VAE_MEMORY_MARGIN * free_bytes


@contextlib.contextmanager
def vae_tiling(
    pipe, setting: bool | str, width: int, height: int, frames: int, device: str | torch.device
) -> Iterator[bool | None]:
    """Tile the Wan VAE's decode for one generation when ``setting`` says so (``"auto"``: when
    :func:`needs_vae_tiling`), restored afterwards; yields whether it tiled (None: no Wan VAE)."""
    vae = _wan_vae(pipe)
    if vae is None:
        yield None
        return
    tile = (
        needs_vae_tiling(width, height, frames, vae.dtype, free_device_bytes(device))
        if setting == "auto"
        else bool(setting)
    )
    was = bool(getattr(vae, "use_tiling", False))
    if tile != was:
        vae.enable_tiling() if tile else vae.disable_tiling()
    try:
        yield tile
    finally:
        if tile != was:
            vae.enable_tiling() if was else vae.disable_tiling()


# ----------------------------------------------------------------------------------------------------------
# Text-embedding cache: a repeated prompt skips the text encoder
# ----------------------------------------------------------------------------------------------------------


def _cache_key(value: Any) -> Any:
    """A hashable form of an ``encode_prompt`` argument, or _UNCACHEABLE (an image, a tensor: run uncached)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    if isinstance(value, list | tuple):
        items = tuple(_cache_key(item) for item in value)
        return _UNCACHEABLE if _UNCACHEABLE in items else items
    return _UNCACHEABLE


_UNCACHEABLE = object()


class PromptCache:
    """A bounded LRU of ``pipe.encode_prompt`` results, keyed by the engine's scope (model id, text encoder
    identity) and every argument of the call (prompt, negative prompt, CFG, max sequence length, device).

    The embeddings stay where the text encoder put them (on the GPU: ~4 MB per Wan prompt pair in bf16, so the
    default 16 entries hold ~64 MB). The pipelines only read them, so handing the same tensors out twice gives
    the same latents (tests/test_pipelining.py checks it). A call with an argument that is not plain data
    (an image) runs uncached."""

    def __init__(self, max_entries: int = 16):
        if max_entries < 0:
            raise ValueError(f"prompt_cache_entries: must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def counts(self) -> tuple[int, int]:
        return self.hits, self.misses

    def counts_since(self, before: tuple[int, int]) -> dict[str, int]:
        """Hits and misses since ``counts()`` returned ``before`` (one task's, as its result reports them)."""
        return {"hits": self.hits - before[0], "misses": self.misses - before[1]}

    def install(self, pipe, scope: Any) -> None:
        """Wrap ``pipe.encode_prompt`` (the runners call it by keyword before the pipeline)."""
        if self.max_entries == 0:
            return
        encode_prompt = pipe.encode_prompt

        def cached_encode_prompt(*args, **kwargs):
            key = _cache_key((scope, args, tuple(sorted(kwargs.items()))))
            # A multi-GPU pipeline (Wan2GP.parallel) shares its prompt encoding across ranks: left uncached.
            if key is _UNCACHEABLE or getattr(pipe, "_hwgp_parallel_layout", None) is not None:
                return encode_prompt(*args, **kwargs)
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key]
            value = encode_prompt(*args, **kwargs)
            with self._lock:
                self.misses += 1
                self._entries[key] = value
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return value

        pipe.encode_prompt = cached_encode_prompt


# ----------------------------------------------------------------------------------------------------------
# Step caching: fewer transformer forwards
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCache:
    """A task's step-caching request, in the original's terms."""

    cache_type: str  # "mag"
    multiplier: float  # target speed-up of the denoising loop: steps / full forwards
    start_step_perc: float  # % of the steps at the start that always run in full


def parse_step_cache(params: Any) -> StepCache | None:
    """The request in a task's params (``skip_steps_cache_type`` / ``_multiplier`` / ``_start_step_perc``),
    None when off; a ValueError naming the field for a bad value."""

    def get(name: str):
        if isinstance(params, dict):
            return params.get(name)
        return getattr(params, name, None)

    cache_type = get("skip_steps_cache_type")
    if cache_type in (None, "", 0):
        return None
    if cache_type == "tea":
        raise ValueError(
            "skip_steps_cache_type: 'tea' (TeaCache) has no implementation in diffusers' hooks here; "
            "use 'mag' (MagCache)"
        )
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"skip_steps_cache_type: {cache_type!r} is not one of '', 'mag'")
    multiplier = get("skip_steps_multiplier")
    multiplier = 1.5 if multiplier is None else multiplier
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not 1.0 <= multiplier <= 10:
        raise ValueError(f"skip_steps_multiplier: must be a number in [1, 10], got {multiplier!r}")
    start = get("skip_steps_start_step_perc")
    start = 20.0 if start is None else start
    if isinstance(start, bool) or not isinstance(start, int | float) or not 0 <= start <= 100:
        raise ValueError(f"skip_steps_start_step_perc: must be a percentage in [0, 100], got {start!r}")
    return StepCache(cache_type, float(multiplier), float(start))


def _full_forwards(ratios: list[float], steps: int, threshold: float, start: int, max_skip: int) -> int:
    """How many of ``steps`` forwards diffusers' MagCache computes in full: its rule, replayed on the ratios.

    As diffusers 0.42.1 runs it on Wan, its step index advances only on computed forwards (a skipped one
    leaves it, so the next forward reads the same ratio again); replayed as such.
    """
    accumulated_ratio, accumulated_err, accumulated_steps, full, index = 1.0, 0.0, 0, 0, 0
    for _ in range(steps):
        ratio = ratios[index] if index < len(ratios) else 1.0
        if index >= start:
            accumulated_ratio *= ratio
            accumulated_steps += 1
            accumulated_err += abs(1.0 - accumulated_ratio)
            if index > 0 and accumulated_err <= threshold and accumulated_steps <= max_skip:
                continue  # skipped
            accumulated_ratio, accumulated_err, accumulated_steps = 1.0, 0.0, 0
        full += 1
        index += 1
    return full


def _resample(ratios: list[float], steps: int) -> list[float]:
    from diffusers.hooks.mag_cache import nearest_interp

    return nearest_interp(torch.tensor(ratios, dtype=torch.float32), steps).tolist()


def mag_threshold(
    ratios: list[float], steps: int, multiplier: float, start_step_perc: float, max_skip_steps: int
) -> float:
    """The smallest MagCache threshold whose schedule runs at most ``steps / multiplier`` full forwards
    (the largest one short of that when even skipping all it may does not reach it)."""
    ratios = _resample(ratios, steps)
    start = int(start_step_perc / 100 * steps + 0.5)
    target = steps / multiplier
    low, high = 0.0, 1.0
    while _full_forwards(ratios, steps, high, start, max_skip_steps) > target and high < 1e3:
        high *= 2
    for _ in range(40):
        middle = (low + high) / 2
        if _full_forwards(ratios, steps, middle, start, max_skip_steps) > target:
            low = middle
        else:
            high = middle
    return high * 1.001  # clear of the boundary: diffusers accumulates the ratios in float32


@dataclass
class StepCacheReport:
    """What step caching did in one generation (the task result's ``step_cache``)."""

    cache_type: str
    multiplier: float
    start_step_perc: float
    threshold: float
    forwards: int = 0  # transformer calls
    computed: int = 0  # of which ran their blocks
    skipped_fraction: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ForwardCounter:
    """Counts transformer calls and the calls whose blocks really ran: the last block's own forward, wrapped
    under whatever hooks wrap it later (a cache hook that skips the block never calls it)."""

    def __init__(self, transformer: torch.nn.Module):
        self.forwards = 0
        self.computed = 0
        self._block = transformer.blocks[-1]
        self._own_forward = vars(self._block).get("forward")  # e.g. the compiled one (compiled_under_hooks)
        inner = self._block.forward

        def counted(*args, **kwargs):
            self.computed += 1
            return inner(*args, **kwargs)

        self._block.forward = counted
        self._handle = transformer.register_forward_pre_hook(self._count_forward)

    def _count_forward(self, module, args) -> None:
        self.forwards += 1

    def remove(self) -> None:
        self._handle.remove()
        if self._own_forward is not None:
            self._block.forward = self._own_forward
        else:
            vars(self._block).pop("forward", None)


MAX_SKIP_STEPS = 3


@contextlib.contextmanager
def eager_blocks(transformers: list[torch.nn.Module]) -> Iterator[bool]:
    """Run compiled blocks eager inside the block (the compiled code is kept for afterwards); yields whether
    any was compiled. diffusers' cache hooks (and Python hooks that read values) are excluded from
    compilation, which a fullgraph-compiled block refuses."""
    compiled = [
        (block, block._compiled_call_impl)
        for transformer in transformers
        for block in transformer.modules()
        if getattr(block, "_compiled_call_impl", None) is not None
    ]
    for block, _ in compiled:
        block._compiled_call_impl = None
    try:
        yield bool(compiled)
    finally:
        for block, call in compiled:
            block._compiled_call_impl = call


@contextlib.contextmanager
def compiled_under_hooks(transformers: list[torch.nn.Module]) -> Iterator[bool]:
    """Move each compiled block's compilation below the block's hooks: its own ``forward`` runs compiled
    (fullgraph, compiled once per block and kept), while hooks registered on it meanwhile (diffusers' cache
    hooks, which decide in Python whether the block runs at all) run eager around it. A compiled ``__call__``
    would trace those hooks, which fullgraph refuses. Yields whether any block was compiled."""
    moved = []
    for transformer in transformers:
        for block in transformer.modules():
            call = getattr(block, "_compiled_call_impl", None)
            if call is None:
                continue
            block._compiled_call_impl = None
            if "forward" not in vars(block):  # (a block whose forward is already wrapped stays eager)
                if getattr(block, "_hwgp_compiled_forward", None) is None:
                    block._hwgp_compiled_forward = torch.compile(block.forward, fullgraph=True)
                block.forward = block._hwgp_compiled_forward
            moved.append((block, call))
    try:
        yield bool(moved)
    finally:
        for block, call in moved:
            if vars(block).get("forward") is getattr(block, "_hwgp_compiled_forward", None):
                del block.forward
            block._compiled_call_impl = call


@contextlib.contextmanager
def step_cache(
    pipe, request: StepCache | None, steps: int, model_id: str
) -> Iterator[StepCacheReport | None]:
    """MagCache on the pipeline's transformer(s) for one generation (removed after it); yields its report,
    filled in when the block exits. Raises ValueError when the model has no calibrated ratios."""
    if request is None:
        yield None
        return
    from diffusers import MagCacheConfig

    ratios = load_mag_ratios(model_id)
    if ratios is None:
        raise ValueError(
            f"skip_steps_cache_type: 'mag' needs the magnitude ratios of model {model_id!r}; calibrate them once "
            f"with: python -m Wan2GP.acceleration calibrate --model {model_id}"
        )
    threshold = mag_threshold(ratios, steps, request.multiplier, request.start_step_perc, MAX_SKIP_STEPS)
    report = StepCacheReport(request.cache_type, request.multiplier, request.start_step_perc, threshold)
    start = int(request.start_step_perc / 100 * steps + 0.5)
    planned = _full_forwards(_resample(ratios, steps), steps, threshold, start, MAX_SKIP_STEPS)
    if planned > steps / request.multiplier:
        report.notes.append(
            f"skip_steps_multiplier {request.multiplier} is out of reach with {steps} steps, "
            f"{request.start_step_perc:g}% kept at the start and at most {MAX_SKIP_STEPS} skips in a row: "
            f"{steps / planned:.2f}x planned"
        )
    config = MagCacheConfig(
        threshold=threshold,
        max_skip_steps=MAX_SKIP_STEPS,
        retention_ratio=request.start_step_perc / 100,
        num_inference_steps=steps,
        mag_ratios=ratios,
    )
    transformers = [t for _, t in _transformers(pipe)]
    unsupported = [type(t).__name__ for t in transformers if not hasattr(t, "blocks")]
    if unsupported:
        raise ValueError(f"skip_steps_cache_type: step caching supports Wan models, not {unsupported[0]}")
    with compiled_under_hooks(transformers) as was_compiled:
        if was_compiled:
            report.notes.append("blocks ran compiled, the cache hooks eager around them")
        counters = [ForwardCounter(t) for t in transformers]
        for transformer in transformers:
            transformer.enable_cache(config)
        try:
            yield report
        finally:
            for transformer in transformers:
                transformer.disable_cache()
        for counter in counters:
            counter.remove()
        report.forwards = sum(c.forwards for c in counters)
        report.computed = sum(c.computed for c in counters)
        report.skipped_fraction = 1 - report.computed / report.forwards if report.forwards else 0.0


# ---- MagCache calibration ----------------------------------------------------------------------------------


def _ratios_file(model_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
    return cache_root() / "mag_ratios" / f"{safe}.json"


def save_mag_ratios(model_id: str, ratios: list[float], steps: int) -> Path:
    path = _ratios_file(model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model_id, "steps": steps, "mag_ratios": ratios}))
    return path


def load_mag_ratios(model_id: str) -> list[float] | None:
    path = _ratios_file(model_id)
    if not path.exists():
        return None
    return list(json.loads(path.read_text())["mag_ratios"])


class _ResidualProbe:
    """Per call of the transformer: ‖residual‖ per token (last block output − first block input), and MagCache's
    ratio to the previous call of the same branch (cond / uncond alternate under CFG)."""

    def __init__(self, transformer: torch.nn.Module, branches: int):
        self.branches = branches
        self.previous: list[torch.Tensor | None] = [None] * branches
        self.ratios: list[list[float]] = [[] for _ in range(branches)]
        self.calls = 0
        self._input: torch.Tensor | None = None
        self._handles = [
            transformer.blocks[0].register_forward_pre_hook(self._first, with_kwargs=True),
            transformer.blocks[-1].register_forward_hook(self._last),
        ]

    def _first(self, module, args, kwargs) -> None:
        self._input = (args[0] if args else kwargs["hidden_states"]).detach()

    def _last(self, module, args, output) -> None:
        branch = self.calls % self.branches
        self.calls += 1
        residual = (output - self._input).float()
        norm = torch.linalg.norm(residual, dim=-1)
        previous = self.previous[branch]
        ratio = 1.0 if previous is None else float((norm / (previous + 1e-8)).mean())
        self.ratios[branch].append(ratio)
        self.previous[branch] = norm

    def remove(self) -> list[float]:
        for handle in self._handles:
            handle.remove()
        # diffusers' MagCache uses one ratio list for every branch: their mean per step.
        return [sum(values) / len(values) for values in zip(*self.ratios, strict=True)]


def calibrate_mag_ratios(engine, task_type: str, params: dict[str, Any]) -> list[float]:
    """Run one generation on ``engine`` with nothing skipped, measuring MagCache's per-step ratios (the mean
    over tokens of ‖residual_t‖ / ‖residual_t-1‖, averaged over the CFG branches), and save them for the
    model. The calibration's steps become the ratios' length (diffusers resamples them to any step count)."""
    from Wan2GP.params import parse_params

    parsed = parse_params(task_type, params)
    definition = engine.resolve_model(task_type, parsed)
    engine.load(definition.id)
    guidance = (
        parsed.guidance_scale if parsed.guidance_scale is not None else definition.defaults.guidance_scale
    )
    with eager_blocks([engine.pipe.transformer]):
        probe = _ResidualProbe(engine.pipe.transformer, branches=2 if guidance > 1.0 else 1)
        try:
            artifact = engine.generate(task_type, params)
        finally:
            ratios = probe.remove()
    save_mag_ratios(definition.id, ratios, artifact.metadata["steps"])
    return ratios


def main(argv: list[str] | None = None) -> None:
    """``python -m Wan2GP.acceleration calibrate --model ID [--steps 50]``: write a model's MagCache ratios."""
    import argparse

    from Wan2GP.engine import Engine

    parser = argparse.ArgumentParser(prog="python -m Wan2GP.acceleration")
    commands = parser.add_subparsers(dest="command", required=True)
    calibrate = commands.add_parser("calibrate", help="measure and save a model's MagCache ratios")
    calibrate.add_argument("--model", required=True)
    calibrate.add_argument("--task-type", default="t2v")
    calibrate.add_argument("--steps", type=int, default=50)
    calibrate.add_argument("--prompt", default="a cat walking in the city at night, cinematic")
    calibrate.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    engine = Engine(device=args.device)
    params = {"model": args.model, "prompt": args.prompt, "num_inference_steps": args.steps, "seed": 0}
    ratios = calibrate_mag_ratios(engine, args.task_type, params)
    print(f"{args.model}: {len(ratios)} ratios -> {_ratios_file(args.model)}")


if __name__ == "__main__":
    main()
