"""One generation split across several processes (GPUs): CFG parallel and Ulysses sequence parallel.

A plain library on ``torch.distributed`` (NCCL on GPUs, gloo on CPU); no Ray. Every rank runs the same
:class:`~Wan2GP.engine.Engine` call with the same params; the ranks cooperate inside the transformer and all
end with the same latents, frames and encoded file.

Modes (``world_size`` = number of ranks):

- ``"cfg"`` (2 ranks): classifier-free guidance split. On each step rank 0 computes the conditional
  prediction and rank 1 the unconditional one; an all-gather gives both to both. The arithmetic is exactly
  the single-process one, so the output is bit-identical.
- ``"ulysses"`` (N ranks): context (sequence) parallel attention through diffusers' own implementation
  (``ContextParallelConfig`` and the Wan transformer's ``_cp_plan``): the video tokens are split across
  ranks before the first block; in self-attention an all-to-all turns the sequence shards into head shards,
  each rank attends over the whole sequence for its heads, and an all-to-all turns them back; the output
  projection gathers the sequence again. Needs ``num_attention_heads % N == 0`` and a token count divisible
  by N (checked before the run, with a message naming the resolution / frame count).
- ``"cfg+ulysses"`` (2·M ranks, M ≥ 2): both; ranks ``[0, M)`` compute the conditional branch with Ulysses
  over M ranks, ranks ``[M, 2M)`` the unconditional one.

What is not denoising is split as well (:class:`ParallelEngine` switches): the prompt is encoded on rank 0
and broadcast; VACE's conditioning (two VAE encodes of the masked guide) is encoded one half per CFG rank;
the VAE decode runs split over time (each rank decodes its latent frames as one chunk, the causal caches of
the decoder's 3D convolutions handed from rank to rank, so the result equals the whole decode up to
rounding); the MP4 is encoded in pieces, one per rank, joined without re-encoding.

Ring attention is not offered: diffusers' ring path needs an attention kernel that returns the log-sum-exp
(flash-attn, cuDNN), which cannot run — and so cannot be tested — on CPU.

Usage on every rank (same params on all ranks)::

    device = init_distributed(rank, world_size, "127.0.0.1", 29500, device="cuda:0")
    engine = Engine(device=str(device))
    parallel = ParallelEngine(engine, mode="cfg")
    artifact = parallel.generate("t2v", {"prompt": "a cat", "seed": 3})

or :func:`run_parallel_generation` for the one-shot form. Cancelling is collective: a rank whose
``should_cancel`` turns True makes every rank stop at the same step (a lone rank stopping would leave the
others waiting in a collective).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from Wan2GP.artifact import Artifact, Rendered
from Wan2GP.parallel_plan import MODES, NCCL_SAFE_ENV, plan_degrees

__all__ = [
    "MODES",
    "NCCL_SAFE_ENV",
    "ParallelEngine",
    "ParallelLayout",
    "DecodeRecorder",
    "build_layout",
    "check_sequence_split",
    "context_parallel_config",
    "decode_split",
    "enable_cfg_parallel",
    "enable_context_parallel",
    "encode_mp4_split",
    "init_distributed",
    "plan_degrees",
    "run_parallel_generation",
    "share_prompt_encoding",
    "split_latent_frames",
    "split_vace_conditioning",
    "wrap_vae_decode",
]

# Wan pipelines whose denoising loop calls the transformer as cache_context("cond") then ("uncond").
_WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline")


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: str | None = None,
    timeout_s: float = 600.0,
    backend: str | None = None,
) -> torch.device:
    """Join the process group (NCCL for a CUDA ``device``, gloo for CPU) and return this rank's device.

    ``device`` defaults to ``cuda:<rank % visible GPUs>`` when CUDA is present, else ``cpu``. The NVLink
    multicast switches of :data:`NCCL_SAFE_ENV` are set before NCCL starts. ``backend="gloo"`` with CUDA
    devices lets several ranks share one GPU (for checks, not for speed: NCCL refuses that).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
    os.environ.update(NCCL_SAFE_ENV)
    if device is None:
        device = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if resolved.index is None:
            resolved = torch.device("cuda", 0)
        torch.cuda.set_device(resolved)
    backend = backend or ("nccl" if resolved.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return resolved


@dataclass
class ParallelLayout:
    """Where this rank sits: its CFG branch (0 = cond, 1 = uncond) and its Ulysses group."""

    mode: str
    rank: int
    world_size: int
    device: torch.device
    cfg_degree: int
    ulysses_degree: int
    mesh: Any  # torch DeviceMesh with dims ("cfg", "ring", "ulysses"); ring is always 1

    @property
    def cfg_rank(self) -> int:
        return self.mesh["cfg"].get_local_rank() if self.cfg_degree > 1 else 0

    @property
    def cfg_group(self):
        return self.mesh.get_group("cfg") if self.cfg_degree > 1 else None

    @property
    def cp_mesh(self):
        return self.mesh["ring", "ulysses"]


def build_layout(mode: str, device: torch.device | str) -> ParallelLayout:
    """The layout of ``mode`` over the initialized process group (a collective: call it on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_distributed() first")
    world_size = dist.get_world_size()
    cfg_degree, ulysses_degree = plan_degrees(mode, world_size)
    device = torch.device(device)
    mesh = init_device_mesh(
        device.type, (cfg_degree, 1, ulysses_degree), mesh_dim_names=("cfg", "ring", "ulysses")
    )
    return ParallelLayout(
        mode=mode,
        rank=dist.get_rank(),
        world_size=world_size,
        device=device,
        cfg_degree=cfg_degree,
        ulysses_degree=ulysses_degree,
        mesh=mesh,
    )


# ----------------------------------------------------------------------------------------------------------
# Context (sequence) parallel: diffusers' Ulysses attention
# ----------------------------------------------------------------------------------------------------------


def context_parallel_config(layout: ParallelLayout):
    """diffusers' ``ParallelConfig`` for Ulysses over the layout's group, set up on this rank.

    Passed as ``parallel_config`` to ``dispatch_attention_fn`` it makes one attention call sequence-parallel.
    """
    from diffusers import ContextParallelConfig, ParallelConfig

    cp_mesh = layout.cp_mesh
    config = ParallelConfig(
        context_parallel_config=ContextParallelConfig(ulysses_degree=layout.ulysses_degree, mesh=cp_mesh)
    )
    config.setup(layout.rank, layout.world_size, layout.device, mesh=cp_mesh)
    return config


def enable_context_parallel(transformer: torch.nn.Module, layout: ParallelLayout) -> None:
    """Shard ``transformer``'s token sequence over the layout's Ulysses group (diffusers' own CP hooks).

    This is what ``ModelMixin.enable_parallelism`` does, minus its device lookup: that one computes
    ``rank % torch.accelerator.device_count()``, which divides by zero on CPU, and it builds its own mesh,
    where the CFG split needs a sub-mesh. The processors, hooks and the model's ``_cp_plan`` are diffusers'.
    """
    from diffusers.hooks.context_parallel import apply_context_parallel

    if layout.ulysses_degree < 2:
        return
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError(f"{type(transformer).__name__} already has a parallel config")
    plan = getattr(transformer, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"{type(transformer).__name__} has no context-parallel plan (_cp_plan)")
    heads = transformer.config.num_attention_heads
    if heads % layout.ulysses_degree:
        raise ValueError(
            f"ulysses degree {layout.ulysses_degree} does not divide the model's {heads} attention heads"
        )
    config = context_parallel_config(layout)
    transformer._parallel_config = config
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, config.context_parallel_config, plan)


def check_sequence_split(pipe, width: int, height: int, frames: int, ulysses_degree: int) -> None:
    """Raise a clear error when the video's token count does not split evenly over the Ulysses ranks."""
    if ulysses_degree < 2:
        return
    transformer = pipe.transformer
    p_t, p_h, p_w = transformer.config.patch_size
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    latent_frames = (frames - 1) // temporal + 1
    tokens = (latent_frames // p_t) * (height // spatial // p_h) * (width // spatial // p_w)
    if tokens % ulysses_degree:
        raise ValueError(
            f"resolution/video_length: {width}x{height}, {frames} frames make {tokens} tokens, "
            f"which do not split evenly over {ulysses_degree} ranks; pick a size or length that does"
        )


# ----------------------------------------------------------------------------------------------------------
# CFG parallel
# ----------------------------------------------------------------------------------------------------------


class _CfgSplit:
    """Per-transformer state of the CFG split: which call is running and the gathered uncond output.

    Installed by patching the transformer instance's ``cache_context`` (the Wan pipelines name each call
    "cond" / "uncond") and ``forward``. The pipe's ``encode_prompt`` is patched to remember the negative
    embeddings, which the uncond rank needs already on the "cond" call.
    """

    def __init__(self, pipe, transformer: torch.nn.Module, layout: ParallelLayout):
        self.pipe = pipe
        self.layout = layout
        self.context: str | None = None
        self.pending_uncond: torch.Tensor | None = None
        self.negative: torch.Tensor | None = None
        self.forward = transformer.forward
        self.cache_context = transformer.cache_context

    @contextlib.contextmanager
    def patched_cache_context(self, name: str, **kwargs) -> Iterator[None]:
        self.context = name
        try:
            with self.cache_context(name, **kwargs):
                yield
        finally:
            self.context = None

    def patched_forward(self, *args, **kwargs):
        if self.context == "uncond" and self.pending_uncond is not None:
            # Already computed by the uncond rank(s) during the "cond" call and gathered: no work here.
            sample, self.pending_uncond = self.pending_uncond, None
            return _as_output(sample, kwargs)
        if self.context != "cond" or not self.pipe.do_classifier_free_guidance:
            return self.forward(*args, **kwargs)
        if "encoder_hidden_states" not in kwargs:
            raise RuntimeError("CFG parallel expects the pipeline to pass encoder_hidden_states by keyword")
        if self.layout.cfg_rank == 1:
            if self.negative is None:
                raise RuntimeError("CFG parallel: no negative prompt embeddings were recorded")
            given = kwargs["encoder_hidden_states"]
            kwargs["encoder_hidden_states"] = self.negative.to(device=given.device, dtype=given.dtype)
        result = self.forward(*args, **kwargs)
        sample = result[0] if isinstance(result, tuple) else result.sample
        gathered = [torch.empty_like(sample) for _ in range(2)]
        dist.all_gather(gathered, sample.contiguous(), group=self.layout.cfg_group)
        cond, self.pending_uncond = gathered
        return _as_output(cond, kwargs)


def _as_output(sample: torch.Tensor, kwargs: dict):
    if kwargs.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    return (sample,)


def enable_cfg_parallel(pipe, layout: ParallelLayout) -> None:
    """Split the cond / uncond transformer calls of a Wan ``pipe`` across the layout's CFG group."""
    if layout.cfg_degree < 2:
        return
    if type(pipe).__name__ not in _WAN_PIPELINES:
        raise ValueError(f"CFG parallel supports {', '.join(_WAN_PIPELINES)}, not {type(pipe).__name__}")
    splits = []
    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        split = _CfgSplit(pipe, transformer, layout)
        transformer.cache_context = split.patched_cache_context
        transformer.forward = split.patched_forward
        splits.append(split)

    encode_prompt = pipe.encode_prompt

    def recording_encode_prompt(*args, **kwargs):
        prompt_embeds, negative = encode_prompt(*args, **kwargs)
        if negative is not None:
            for split in splits:
                split.negative = negative
        return prompt_embeds, negative

    pipe.encode_prompt = recording_encode_prompt


# ----------------------------------------------------------------------------------------------------------
# What is not denoising: prompt encoding once, VAE decode split over time, MP4 encode split over time
# ----------------------------------------------------------------------------------------------------------


def share_prompt_encoding(pipe, layout: ParallelLayout) -> None:
    """Encode the prompt on rank 0 only and broadcast the embeddings: the other ranks skip the text encoder.

    Wraps ``pipe.encode_prompt`` (the engine's runners call it before the pipeline, by keyword). The shapes go
    first (one small object broadcast), then each tensor; ``None`` (no negative prompt without CFG) travels too.
    """
    encode_prompt = pipe.encode_prompt
    device = layout.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def shared_encode_prompt(*args, **kwargs):
        if layout.rank == 0:
            embeds = encode_prompt(*args, **kwargs)
            header = [[None if e is None else (tuple(e.shape), e.dtype) for e in embeds]]
        else:
            embeds, header = None, [None]
        dist.broadcast_object_list(header, src=0)
        out = []
        for index, spec in enumerate(header[0]):
            if spec is None:
                out.append(None)
                continue
            shape, dtype = spec
            if layout.rank == 0:
                buffer = embeds[index].to(device).contiguous()
            else:
                buffer = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buffer, src=0)
            target = kwargs.get("device") or layout.device
            out.append(embeds[index] if layout.rank == 0 else buffer.to(target))
        return tuple(out)

    pipe.encode_prompt = shared_encode_prompt


class _EncodedLatents:
    """What ``vae.encode`` returns, for a latent computed elsewhere: diffusers' ``retrieve_latents(...,
    sample_mode="argmax")`` reads ``latent_dist.mode()``."""

    def __init__(self, latents: torch.Tensor):
        self.latent_dist = self
        self._latents = latents

    def mode(self) -> torch.Tensor:
        return self._latents


def split_vace_conditioning(pipe, layout: ParallelLayout) -> None:
    """VACE's conditioning encoded half per CFG rank: ``WanVACEPipeline.prepare_video_latents`` encodes the
    guide twice (its kept part ``video·(1-mask)`` and its generated part ``video·mask``, each a full-length VAE
    encode); CFG rank 0 encodes the first, rank 1 the second, and an all-gather gives both to both. The
    pipeline's own method then runs with those two results in place of its two encodes (its reference images,
    one frame each, it still encodes itself), so the latents are the single-GPU ones bit for bit.

    Without a CFG split, or without a mask (one encode), the pipeline encodes as usual."""
    if layout.cfg_degree != 2:
        return
    prepare = pipe.prepare_video_latents
    vae = pipe.vae

    def prepare_video_latents(video, mask, reference_images=None, generator=None, device=None):
        if mask is None or video.shape[0] != 1:
            return prepare(video, mask, reference_images, generator, device)
        dtype = vae.dtype
        binary = torch.where(mask > 0.5, 1.0, 0.0).to(dtype=dtype)  # as the pipeline makes the two halves
        halves = (video.to(dtype=dtype) * (1 - binary), video.to(dtype=dtype) * binary)
        mine = vae.encode(halves[layout.cfg_rank]).latent_dist.mode().contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=layout.cfg_group)
        given = list(both)
        encode = vae.encode

        def encode_given_first(x, return_dict: bool = True):
            return _EncodedLatents(given.pop(0)) if given else encode(x, return_dict=return_dict)

        vae.encode = encode_given_first
        try:
            latents = prepare(video, mask, reference_images, generator, device)
        finally:
            vae.encode = encode
        if given:  # the pipeline no longer encodes the two halves first: fail loudly, not silently wrong
            raise RuntimeError("split VACE conditioning: the pipeline did not take both encoded halves")
        return latents

    pipe.prepare_video_latents = prepare_video_latents


class DecodeRecorder:
    """Wraps ``vae.decode``: records the latents it is given (the final latents, for equivalence checks) and,
    with a ``layout``, decodes them split over time across the ranks (:func:`decode_split`).

    One per VAE instance (pipelines that share a VAE share it): :func:`wrap_vae_decode` returns the existing one.
    """

    def __init__(self, vae, layout: ParallelLayout | None = None):
        self.vae = vae
        self.layout = layout
        self.original = vae.decode
        self.last_latents: torch.Tensor | None = None  # on the CPU, float32
        self.split_used = False
        self.timings: dict[str, float] = {}  # the last split decode's parts (decode_split), seconds

    def __call__(self, z: torch.Tensor, return_dict: bool = True):
        self.last_latents = z.detach().to("cpu", torch.float32)
        video = None
        self.timings = {}
        if self.layout is not None and self.layout.world_size > 1:
            video = decode_split(self.vae, z, self.layout.rank, self.layout.world_size, self.timings)
        self.split_used = video is not None
        if video is None:
            return self.original(z, return_dict=return_dict)
        if not return_dict:
            return (video,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=video)


def wrap_vae_decode(vae, layout: ParallelLayout | None = None) -> DecodeRecorder:
    """Install (once) a :class:`DecodeRecorder` on ``vae``; a later call with a layout turns the split on."""
    recorder = getattr(vae, "_hwgp_decode_recorder", None)
    if recorder is None:
        recorder = DecodeRecorder(vae, layout)
        vae.decode = recorder
        vae._hwgp_decode_recorder = recorder
    elif layout is not None:
        recorder.layout = layout
    return recorder


def split_latent_frames(latent_frames: int, world_size: int) -> list[tuple[int, int]] | None:
    """Latent frames ``[start, end)`` per rank for :func:`decode_split`, or None when it cannot split.

    Latent frame 0 decodes to 1 frame and each later one to 4, so rank 0 takes frame 0 plus an even share of
    the rest. Rank 0 needs at least one frame past frame 0 (frame 0 is decoded alone, as the first chunk).
    """
    rest = latent_frames - 1
    if world_size < 2 or rest < world_size:
        return None
    bounds = [1 + rest * r // world_size for r in range(world_size + 1)]
    bounds[0] = 0
    return [(bounds[r], bounds[r + 1]) for r in range(world_size)]


class _HaloCache(list):
    """The Wan VAE decoder's ``feat_cache`` list, whose slots come from / go to the neighbouring ranks.

    The decoder's causal 3D convolutions read slot ``i`` (the last two input frames of conv ``i`` of the
    previous chunk) and then write it for the next chunk. A rank starting in the middle of the video receives
    each slot from the rank before it at its first read; a rank with a rank after it sends each slot as it
    writes it in its last chunk. So every rank computes exactly what one process decoding the whole video
    computes, layer by layer in step with its neighbours.
    """

    def __init__(self, size: int, device: torch.device, dtype: torch.dtype, previous: int | None):
        super().__init__([None] * size)
        self.device, self.dtype, self.previous = device, dtype, previous
        self.next: int | None = None
        self.received: set[int] = set()
        self.pending: list = []  # isend handles and the buffers they read

    def __getitem__(self, index):
        if self.previous is not None and index not in self.received:
            self.received.add(index)
            header = torch.empty(5, dtype=torch.int64, device=self.device)
            dist.recv(header, src=self.previous)
            slot = torch.empty(tuple(header.tolist()), dtype=self.dtype, device=self.device)
            dist.recv(slot, src=self.previous)
            super().__setitem__(index, slot)
        return super().__getitem__(index)

    def __setitem__(self, index, value) -> None:
        super().__setitem__(index, value)
        if self.next is not None and isinstance(value, torch.Tensor):
            header = torch.tensor(value.shape, dtype=torch.int64, device=self.device)
            data = value.to(self.device, self.dtype).contiguous()
            self.pending.append((dist.isend(header, dst=self.next), header))
            self.pending.append((dist.isend(data, dst=self.next), data))

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def _splittable(vae) -> bool:
    """The Wan2.1-style VAE (no residual up blocks, no patching), with tiling off."""
    config = vae.config
    return (
        type(vae).__name__ == "AutoencoderKLWan"
        and not getattr(config, "is_residual", False)
        and getattr(config, "patch_size", None) in (None, 1)
        and not getattr(vae, "use_tiling", False)
    )


def decode_split(
    vae, z: torch.Tensor, rank: int, world_size: int, timings: dict[str, float] | None = None
) -> torch.Tensor | None:
    """Decode latents ``z`` (B, C, T, H, W) with the frames split across the ranks; every rank gets the video.

    A collective: every rank calls it with the same ``z``. Rank r decodes its latent frames of
    :func:`split_latent_frames` as one chunk (rank 0 first decodes frame 0 alone, as the VAE does), the
    decoder's causal caches passing from rank to rank (:class:`_HaloCache`); the pieces are then gathered.
    Equal to ``vae.decode(z)`` up to the convolution kernels' rounding on the larger chunks. Returns None
    (decode whole) for a VAE or a length it cannot split. ``timings``, when given, gets this rank's seconds
    in its chunks (``decode_chunks``, waits for the previous rank's caches included), waiting for its caches
    to reach the next rank (``decode_handoff``) and gathering the video (``decode_gather``).
    """
    plan = split_latent_frames(z.shape[2], world_size)
    if plan is None or not _splittable(vae):
        return None
    clock = _SyncedClock(z.device, timings)
    start, end = plan[rank]
    decoder = vae.decoder
    vae.clear_cache()
    x = vae.post_quant_conv(z[:, :, start:end])
    transport = x.device if dist.get_backend() == "nccl" else torch.device("cpu")
    cache = _HaloCache(len(vae._feat_map), transport, x.dtype, previous=rank - 1 if rank > 0 else None)
    pieces = []
    if rank == 0:
        pieces.append(decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True))
        x = x[:, :, 1:]
    cache.next = rank + 1 if rank < world_size - 1 else None
    pieces.append(decoder(x, feat_cache=cache, feat_idx=[0]))
    clock.lap("decode_chunks")
    cache.wait()
    clock.lap("decode_handoff")
    vae.clear_cache()
    mine = torch.clamp(torch.cat(pieces, dim=2), min=-1.0, max=1.0)

    # Gather the pieces (of different lengths: padded to the longest, then trimmed).
    gather_device = mine.device if dist.get_backend() == "nccl" else torch.device("cpu")
    length = torch.tensor([mine.shape[2]], dtype=torch.int64, device=gather_device)
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n.item()) for n in lengths]
    longest = max(lengths)
    padded = torch.zeros((*mine.shape[:2], longest, *mine.shape[3:]), dtype=mine.dtype, device=gather_device)
    padded[:, :, : mine.shape[2]] = mine
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    video = torch.cat([piece[:, :, :n] for piece, n in zip(gathered, lengths, strict=True)], dim=2)
    clock.lap("decode_gather")
    return video.to(z.device)


class _SyncedClock:
    """Seconds between laps into ``timings`` (nothing when it is None). At each lap the CPU waits for the work
    queued on the current stream, not for the whole device, whose NCCL stream may still be sending this
    rank's caches: so a lap holds this rank's own work and what that stream was made to wait for in it."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device, self.timings = device, timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def encode_mp4_split(frames, fps: int, rank: int, world_size: int) -> bytes:
    """Encode a video as every rank encoding its share of the frames (a collective), then one stream copy.

    Each rank encodes frames ``[r·T/N, (r+1)·T/N)`` with :func:`Wan2GP.video.encode_mp4` (same codec and
    settings, so the pieces join without re-encoding); the pieces are all-gathered and joined with ffmpeg's
    concat demuxer (``-c copy``, no re-encode). Every rank returns the same bytes. The joined file differs
    from one encode of the whole video only by where the encoder put key frames (a new one at each join).
    """
    from Wan2GP.video import MIN_JOIN_FRAMES, encode_mp4, join_mp4

    count = len(frames)
    if world_size < 2 or count < MIN_JOIN_FRAMES * world_size:
        return encode_mp4(frames, fps=fps)
    bounds = [count * r // world_size for r in range(world_size + 1)]
    mine = encode_mp4(frames[bounds[rank] : bounds[rank + 1]], fps=fps)
    pieces: list = [None] * world_size
    dist.all_gather_object(pieces, mine)
    return join_mp4(pieces, [b - a for a, b in zip(bounds, bounds[1:], strict=False)], fps)


# ----------------------------------------------------------------------------------------------------------
# The engine, parallel
# ----------------------------------------------------------------------------------------------------------


class ParallelEngine:
    """An :class:`~Wan2GP.engine.Engine` whose Wan generations run across the process group.

    Every rank builds its own engine (same catalog, its own device) and calls :meth:`generate` with the same
    arguments. Parallelism is applied to each pipeline the engine loads, once; resident memory profile only
    (offloading hooks would fight the context-parallel hooks).

    Besides the denoising split of ``mode``, what is not denoising is split too (each switch can be turned
    off, for comparison): ``share_prompt`` encodes the prompt on rank 0 only and broadcasts the embeddings;
    ``split_conditioning`` has the two CFG ranks encode one half of VACE's conditioning each
    (:func:`split_vace_conditioning`, exact);
    ``split_decode`` decodes the final latents split over time across all ranks (:func:`decode_split`,
    exact); ``split_encode`` has every rank encode its share of the frames into the MP4
    (:func:`encode_mp4_split`).
    """

    def __init__(
        self,
        engine,
        mode: str = "cfg",
        layout: ParallelLayout | None = None,
        *,
        share_prompt: bool = True,
        split_conditioning: bool = True,
        split_decode: bool = True,
        split_encode: bool = True,
    ):
        if engine.memory_profile != "resident":
            raise ValueError(
                f"memory_profile: parallel generation needs 'resident', got {engine.memory_profile!r}"
            )
        # The split decode is a collective, so every rank must decode the same way: a tiling decision made
        # from each rank's free memory could differ between them. A rank decodes a 1/N share anyway.
        engine.acceleration = replace(engine.acceleration, vae_tiling=False)
        self.engine = engine
        self.layout = layout if layout is not None else build_layout(mode, engine.device)
        self.mode = self.layout.mode
        self.share_prompt, self.split_decode, self.split_encode = share_prompt, split_decode, split_encode
        self.split_conditioning = split_conditioning
        self._prepared: set[int] = set()
        if split_encode:
            rank, world_size = self.layout.rank, self.layout.world_size
            engine.video_encoder = lambda frames, fps: encode_mp4_split(frames, fps, rank, world_size)

    @property
    def last_latents(self) -> torch.Tensor | None:
        """The final latents of the last generation (what the VAE decoded), on the CPU in float32."""
        recorder = getattr(getattr(self.engine.pipe, "vae", None), "_hwgp_decode_recorder", None)
        return recorder.last_latents if recorder is not None else None

    @property
    def rank(self) -> int:
        return self.layout.rank

    def prepare(self, model_id: str) -> None:
        """Load ``model_id`` (collectively, same id on every rank) and make its pipeline parallel."""
        self.engine.load(model_id)
        pipe = self.engine.pipe
        if id(pipe) in self._prepared:
            return
        if getattr(pipe, "_hwgp_parallel_layout", None) is not None:
            # Wrapping twice would gather twice per step; one engine, one ParallelEngine.
            raise RuntimeError(f"model {model_id!r} was made parallel by another ParallelEngine")
        if type(pipe).__name__ not in _WAN_PIPELINES:
            raise ValueError(
                f"model {model_id!r}: parallel generation supports Wan pipelines, not {type(pipe).__name__}"
            )
        enable_context_parallel(pipe.transformer, self.layout)
        if self.share_prompt:
            share_prompt_encoding(pipe, self.layout)
        if self.split_conditioning and type(pipe).__name__ == "WanVACEPipeline":
            split_vace_conditioning(pipe, self.layout)
        enable_cfg_parallel(pipe, self.layout)
        wrap_vae_decode(pipe.vae, self.layout if self.split_decode else None)
        pipe._hwgp_parallel_layout = self.layout
        self._prepared.add(id(pipe))

    def generate(
        self,
        task_type: str,
        params: dict[str, Any],
        *,
        task_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Artifact:
        """Run one task across all ranks; every rank returns the same artifact.

        A random seed (-1 or missing) is drawn on rank 0 and shared, so all ranks denoise the same noise.
        """
        return self._run(self.engine.generate, task_type, params, task_id, progress, should_cancel)

    def render(
        self,
        task_type: str,
        params: dict[str, Any],
        *,
        task_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Rendered:
        """As :meth:`generate`, without the encode: every rank returns the same frames (for a caller that
        uses them, such as the next segment of a chained travel, and encodes the file itself)."""
        return self._run(self.engine.render, task_type, params, task_id, progress, should_cancel)

    def _run(self, engine_call, task_type, params, task_id, progress, should_cancel):
        params = self._shared_params(task_type, params)
        cancel = self._collective_cancel(should_cancel)
        output = engine_call(task_type, params, task_id=task_id, progress=progress, should_cancel=cancel)
        recorder = getattr(getattr(self.engine.pipe, "vae", None), "_hwgp_decode_recorder", None)
        if recorder is not None and recorder.split_used:  # where the decode stage's time went, on this rank
            timings = output.metadata.setdefault("timings", {})
            timings.update({name: round(seconds, 4) for name, seconds in recorder.timings.items()})
        return output

    def _shared_params(self, task_type: str, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with a random seed drawn once for all ranks; the model made resident and parallel."""
        from Wan2GP.params import parse_params

        params = dict(params)
        seed = params.get("seed", -1)
        try:
            random_seed = int(seed) < 0
        except (TypeError, ValueError):
            random_seed = False  # parse_params below rejects it, naming the field
        if random_seed:
            shared = [random.SystemRandom().randrange(2**32) if self.rank == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            params["seed"] = shared[0]

        parsed = parse_params(task_type, params)
        definition = self.engine.resolve_model(task_type, parsed)
        self.prepare(definition.id)
        if self.layout.ulysses_degree > 1:
            settings = self.engine._settings(definition, definition.family, parsed)
            check_sequence_split(
                self.engine.pipe, settings.width, settings.height, settings.frames, self.layout.ulysses_degree
            )
        return params

    def _collective_cancel(self, should_cancel: Callable[[], bool] | None) -> Callable[[], bool]:
        """True on every rank as soon as any rank's ``should_cancel`` is (one all-reduce per check)."""
        device = self.layout.device if dist.get_backend() == "nccl" else torch.device("cpu")

        def check() -> bool:
            local = bool(should_cancel()) if should_cancel is not None else False
            flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        return check


_PARALLEL_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_parallel_generation(
    engine,
    task_type: str,
    params: dict[str, Any],
    mode: str = "cfg",
    *,
    task_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    **options: bool,
) -> Artifact:
    """Run one task across the (initialized) process group; every rank calls it with the same arguments.

    The first call for an ``engine`` builds its layout and :class:`ParallelEngine` (kept for the next calls,
    so a model is made parallel once; ``options`` are its switches); an engine stays in the mode of its first
    call.
    """
    parallel = _PARALLEL_ENGINES.get(engine)
    if parallel is None:
        parallel = _PARALLEL_ENGINES[engine] = ParallelEngine(engine, mode=mode, **options)
    elif parallel.mode != mode:
        raise ValueError(f"mode: this engine already runs {parallel.mode!r}; use a new engine for {mode!r}")
    return parallel.generate(
        task_type, params, task_id=task_id, progress=progress, should_cancel=should_cancel
    )
