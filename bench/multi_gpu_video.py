"""One video split across GPUs: seconds per video through the multi-GPU Serve replica vs one GPU, same run.

    python -m bench.multi_gpu_video [--gpus 2] [--modes cfg] [--steps 10,50] [--compare-whole]
    python -m bench.multi_gpu_video --tiny    # CPU smoke check: tiny model, gloo, fake GPUs

The full-size Wan2.1-T2V-1.3B architecture with random weights (bench/common.py, no downloads) at 832x480,
81 frames, CFG 5.0. The 1-GPU baseline is the engine in this process (no Ray hop, which favours it); each
parallel run is a ``MultiGpuGenerationDeployment`` whose replica spans ``--gpus`` GPUs (one worker actor
per GPU, NCCL with NVLink multicast off), with the prompt encoded once, the VAE decode and the MP4 encode
split across the ranks (Wan2GP/parallel.py). ``--compare-whole`` also times the replica with those three off
(every rank decodes and encodes the whole video), at the first step count. ``--gpu-views replica,own`` times
the replica with its rank workers seeing all of its GPUs (the default) and then each its own alone. Every
configuration is warmed by a 2-step video, then one video per step count is timed (stream start to ``done``).

Equivalence against the 1-GPU run (same seed): the final latents (what the VAE decodes: relative and
max-abs error) and the decoded MP4 frames. With ``--decode-check`` the baseline's latents are also decoded
whole on one GPU and split over ``--gpus`` GPUs in plain processes: decode seconds and relative error.
Goals (issue 22, 2 GPUs, CFG parallel): >= 1.8x at 10 steps, >= 1.9x at 50.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    PROMPT,
    max_abs_error,
    model_label,
    models_root,
    prepare_models,
    relative_error,
    require_gpus,
    start_ray,
)
from hwgp_testing import free_port

GOALS = {10: 1.8, 50: 1.9}
WHOLE = {"share_prompt": False, "split_conditioning": False, "split_decode": False, "split_encode": False}


def _video_params(model_id: str, args, steps: int) -> dict:
    return {"model": model_id, "prompt": PROMPT, "resolution": f"{args.width}x{args.height}",
            "video_length": args.frames, "num_inference_steps": steps, "guidance_scale": 5.0,
            "seed": 3}  # fmt: skip


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _baseline(args, models_dir: str, model_id: str, steps_list: list[int]) -> dict[int, dict]:
    """The engine on one GPU in this process: seconds, final latents and decoded frames per step count."""
    import torch

    from Wan2GP.catalog import Catalog
    from Wan2GP.engine import Engine
    from Wan2GP.parallel import wrap_vae_decode
    from Wan2GP.video import decode_video

    engine = Engine(device="cpu" if args.tiny else "cuda:0", catalog=Catalog.load(models_dir), lora_dirs=[])
    engine.load(model_id)
    recorder = wrap_vae_decode(engine.pipe.vae)  # records the final latents; decodes whole
    engine.generate("t2v", _video_params(model_id, args, 2))  # warm: kernels, allocator
    runs = {}
    for steps in steps_list:
        _sync()
        start = time.perf_counter()
        artifact = engine.generate("t2v", _video_params(model_id, args, steps))
        _sync()
        runs[steps] = {
            "seconds": time.perf_counter() - start,
            "latents": recorder.last_latents.numpy(),
            "frames": decode_video(artifact.data)[0],
            "timings": artifact.metadata["timings"],
        }
        print(f"1 GPU, {steps} steps: {runs[steps]['seconds']:.1f}s {runs[steps]['timings']}", flush=True)
    del engine, recorder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return runs


def _replica(
    args, gpus, mode, options, models_dir, model_id, steps_list, baseline, gpu_view: str = "replica"
) -> list[dict]:
    """The multi-GPU replica (its rank workers seeing ``gpu_view``): one row per step count."""
    from ray import serve

    from deployments.multi_gpu import MultiGpuGenerationDeployment, multi_gpu_options
    from Wan2GP.video import decode_video

    cpus = 0.5 if args.tiny else 2.0
    replica = MultiGpuGenerationDeployment.options(**multi_gpu_options(gpus, cpus_per_rank=cpus)).bind(
        family="T2V",
        default_models={"t2v": model_id},
        world_size=gpus,
        mode=mode,
        device="cpu" if args.tiny else None,
        models_dir=models_dir,
        cpus_per_rank=cpus,
        preload=model_id,
        parallel_options=options,
        gpu_view=gpu_view,
    )
    handle = serve.run(replica, name="multi", route_prefix=None)

    def run(steps: int):
        start = time.perf_counter()
        events = list(
            handle.generate.options(stream=True).remote("t2v", _video_params(model_id, args, steps))
        )
        seconds = time.perf_counter() - start
        if events[-1]["event"] != "done":
            raise RuntimeError(f"generation failed: {events[-1]}")
        return seconds, events[-1]["artifact"]

    run(2)  # warm: kernels, NCCL communicators
    label = mode if options is None else f"{mode}, whole decode/encode"
    label += "" if gpu_view == "replica" else f", gpu_view {gpu_view}"
    rows = []
    for steps in steps_list:
        seconds, artifact = run(steps)
        latents = handle.last_latents.remote().result()
        base = baseline[steps]
        row = {
            "gpus": gpus,
            "mode": label,
            "steps": steps,
            "s_per_video": seconds,
            "base_s": base["seconds"],
            "speedup": base["seconds"] / seconds,
            "latent_rel_error": relative_error(latents, base["latents"]),
            "latent_max_abs_error": max_abs_error(latents, base["latents"]),
            "frame_rel_error": relative_error(decode_video(artifact.data)[0], base["frames"]),
            "timings": artifact.metadata["timings"],
        }
        print(f"{gpus} GPUs {label}, {steps} steps: {seconds:.1f}s, {row['speedup']:.2f}x, latents rel "
              f"{row['latent_rel_error']:.2e} max-abs {row['latent_max_abs_error']:.2e}, frames rel "
              f"{row['frame_rel_error']:.2e} {row['timings']}", flush=True)  # fmt: skip
        rows.append(row)
    serve.delete("multi")
    return rows


# ---- the decode on its own: whole on one GPU vs split over the GPUs (plain processes) ------------------------


def _decode_rank(
    rank: int, world_size: int, port: int, vae_folder: str, latents_path: str, out: str, shared: bool,
    isolated: bool = False, channels_last: bool = False, in_actor: bool = False,
) -> None:  # fmt: skip
    """One rank of the decode/encode check: the VAE decode split vs whole, the MP4 encode in pieces vs whole.
    ``shared``: every rank on cuda:0 over gloo (one GPU: the errors count, the split decode's time does not).
    ``isolated``: each rank sees its own GPU alone (CUDA_VISIBLE_DEVICES, as Ray sets it for the service's
    rank workers); ``channels_last``: the VAE's convolutions in channels-last layout, as the engine has them
    on a GPU (Wan2GP/acceleration.py); ``in_actor``: run by :func:`_decode_check` in a Ray actor, which sees
    the GPU Ray gave it as cuda:0."""
    if isolated and not in_actor:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # before CUDA starts in this fresh process
    import torch
    from diffusers import AutoencoderKLWan

    from Wan2GP.parallel import decode_split, encode_mp4_split, init_distributed
    from Wan2GP.video import decode_video, encode_mp4, to_uint8_frames

    cuda = torch.cuda.is_available()
    device = ("cuda:0" if shared or isolated or in_actor else f"cuda:{rank}") if cuda else "cpu"
    device = init_distributed(
        rank, world_size, "127.0.0.1", port, device=device, backend="gloo" if shared else None
    )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    vae = AutoencoderKLWan.from_pretrained(vae_folder, torch_dtype=torch.float32).to(device)
    if channels_last:
        from Wan2GP.acceleration import channels_last_convolutions

        channels_last_convolutions(vae)
    z = torch.from_numpy(np.load(latents_path)).to(device)
    result = {"shared_gpu": shared, "isolated": isolated, "channels_last": channels_last, "in_actors": in_actor,
              "torch_threads": torch.get_num_threads()}  # fmt: skip
    with torch.no_grad():
        for _ in range(2):  # the first of each is a warm-up
            torch.distributed.barrier()
            sync()
            start = time.perf_counter()
            parts: dict[str, float] = {}
            split = decode_split(vae, z, rank, world_size, parts)
            sync()
            result["split_s"] = time.perf_counter() - start
            result["split_parts"] = parts
        whole = None
        if rank == 0:
            for _ in range(2):
                sync()
                start = time.perf_counter()
                whole = vae.decode(z).sample
                sync()
                result["whole_s"] = time.perf_counter() - start
            result["rel_error"] = float((split - whole).norm() / whole.norm())
            result["max_abs_error"] = float((split - whole).abs().max())
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    # The MP4: every rank encodes its share in parallel and the pieces are joined, vs one encode of all frames.
    frames = to_uint8_frames((split[0].permute(1, 2, 3, 0).float().cpu().numpy() + 1) / 2)
    torch.distributed.barrier()
    start = time.perf_counter()
    joined = encode_mp4_split(frames, 16, rank, world_size)
    result["encode_split_s"] = time.perf_counter() - start
    if rank == 0:
        start = time.perf_counter()
        single = encode_mp4(frames, fps=16)
        result["encode_whole_s"] = time.perf_counter() - start
        result["encode_rel_error"] = relative_error(decode_video(joined)[0], decode_video(single)[0])
        result["encode_bytes"] = [len(single), len(joined)]
        Path(out).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


ACTOR_CHECK_TIMEOUT_S = 600.0  # the ranks' process group gives up after the same time (init_distributed)


def _decode_check(
    gpus: int, vae_folder: str, latents: np.ndarray, shared: bool, isolated: bool = False,
    channels_last: bool = False, in_actors: bool = False, actor_cpus: float = 1.0,
) -> dict:  # fmt: skip
    """The decode/encode check's ranks as plain processes, or with ``in_actors`` as the service runs its rank
    workers: threaded Ray actors (one GPU each, or a share of one when ``shared``; ``actor_cpus`` CPUs, which
    Ray turns into as many torch threads, at least one) whose rank 0 is polled every 0.2 s meanwhile, as the
    replica polls its progress."""
    tmp = Path(tempfile.mkdtemp(prefix="hwgp-decode-"))
    np.save(tmp / "latents.npy", latents)
    out = str(tmp / "decode.json")
    args = (gpus, free_port(), vae_folder, str(tmp / "latents.npy"), out, shared, isolated, channels_last)
    if not in_actors:
        import torch.multiprocessing as mp

        mp.spawn(_decode_rank, args=args, nprocs=gpus, join=True)
        return json.loads(Path(out).read_text())
    import ray

    @ray.remote(max_concurrency=4)
    class DecodeRank:
        def run(self, rank: int) -> None:
            _decode_rank(rank, *args, in_actor=True)

        def poll(self) -> list:
            return []

    start_ray(gpus if not shared else 1)
    try:
        actors = [
            DecodeRank.options(num_gpus=1 / gpus if shared else 1, num_cpus=actor_cpus).remote()
            for _ in range(gpus)
        ]
        runs = [actor.run.remote(rank) for rank, actor in enumerate(actors)]
        deadline = time.monotonic() + ACTOR_CHECK_TIMEOUT_S
        while len(ray.wait(runs, num_returns=len(runs), timeout=0.2)[0]) < len(runs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the decode check's actors ran past {ACTOR_CHECK_TIMEOUT_S:.0f} s")
            ray.get(actors[0].poll.remote(), timeout=30)
        ray.get(runs, timeout=30)
    finally:
        ray.shutdown()
    return json.loads(Path(out).read_text())


def _print_decode(decode: dict, gpus: int) -> None:
    if decode["shared_gpu"]:
        where = "2 ranks sharing one GPU over gloo (its time is not a speed)"
    else:
        where = f"{gpus} GPUs, " + ("each rank seeing its GPU alone" if decode["isolated"] else "all visible")
        where += ", channels-last" if decode["channels_last"] else ""
    if decode.get("in_actors"):
        where += (
            f", ranks in threaded Ray actors ({decode['torch_threads']} torch threads each, rank 0 polled)"
        )
    parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in decode["split_parts"].items())
    print(f"VAE decode alone, {where}: whole on 1 GPU {decode['whole_s']:.2f}s, split {decode['split_s']:.2f}s "
          f"(rank 0: {parts}); rel. error {decode['rel_error']:.2e}, max-abs {decode['max_abs_error']:.2e}, "
          f"peak {decode['peak_gib']:.1f} GiB on rank 0")  # fmt: skip
    print(f"MP4 encode of the decoded frames: whole {decode['encode_whole_s']:.2f}s, {gpus} pieces in parallel + "
          f"join {decode['encode_split_s']:.2f}s; decoded-frame rel. error {decode['encode_rel_error']:.2e}; "
          f"bytes {decode['encode_bytes']}")  # fmt: skip


def _rank_work_times(vae_folder: str, latents, world_size: int, channels_last: bool) -> dict:
    """The split decode's per-rank work, one rank after the other on one GPU: each rank's chunks as
    :func:`~Wan2GP.parallel.decode_split` runs them (the caches handed on in memory), vs the whole decode.
    On 2 GPUs the split takes about the slowest rank's time plus the hand-over and gather."""
    import torch
    from diffusers import AutoencoderKLWan

    from Wan2GP.parallel import split_latent_frames

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKLWan.from_pretrained(vae_folder, torch_dtype=torch.float32).to(device)
    if channels_last:
        from Wan2GP.acceleration import channels_last_convolutions

        channels_last_convolutions(vae)
    z = latents.to(device)
    plan = split_latent_frames(z.shape[2], world_size)
    times: dict = {}
    with torch.no_grad():
        for _ in range(2):  # the first is a warm-up
            _sync()
            start = time.perf_counter()
            vae.decode(z)
            _sync()
            times["whole_s"] = time.perf_counter() - start
            vae.clear_cache()
            x = vae.post_quant_conv(z)
            cache: list = [None] * len(vae._feat_map)
            ranks, halo = [], []
            for rank, (first, last) in enumerate(plan):
                _sync()
                start = time.perf_counter()
                if rank == 0:
                    vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)
                    first += 1
                vae.decoder(x[:, :, first:last], feat_cache=cache, feat_idx=[0])
                _sync()
                ranks.append(time.perf_counter() - start)
                if rank < len(plan) - 1:  # what _HaloCache sends the next rank: every slot, as written here
                    halo.append(sum(t.numel() * t.element_size() for t in cache if torch.is_tensor(t)))
            times["ranks_s"], times["halo_bytes"] = ranks, halo
            vae.clear_cache()
    return times


def one_gpu_checks(args, gpus: int) -> None:
    """On one GPU: each rank's share of the split decode's work, timed (whole vs ranks, with and without the
    engine's channels-last layout); the split decode's error at full size (ranks share the GPU over gloo) and
    the split encode."""
    import torch

    from bench.common import build_t2v

    folder = models_root(Path(tempfile.mkdtemp(prefix="hwgp-mgv-"))) / "bench-wan2.1-t2v-1.3b"
    if args.tiny:  # a narrower Wan VAE on CPU
        from diffusers import AutoencoderKLWan

        folder = Path(tempfile.mkdtemp(prefix="hwgp-vae-"))
        AutoencoderKLWan(base_dim=8).save_pretrained(str(folder / "vae"))
    elif not (folder / "model_index.json").exists():
        build_t2v(folder)
        torch.cuda.empty_cache()
    latent_frames = (args.frames - 1) // 4 + 1
    latents = torch.randn(
        1, 16, latent_frames, args.height // 8, args.width // 8, generator=torch.Generator().manual_seed(0)
    )
    shared = not torch.cuda.is_available() or torch.cuda.device_count() < gpus
    for channels_last in (False, True) if torch.cuda.is_available() else (False,):
        times = _rank_work_times(str(folder / "vae"), latents, gpus, channels_last)
        ranks = ", ".join(f"rank {r} {seconds:.3f}s" for r, seconds in enumerate(times["ranks_s"]))
        print(f"VAE decode of {args.frames} frames on 1 GPU{', channels-last' if channels_last else ''}: "
              f"whole {times['whole_s']:.3f}s; the split's work of {ranks} "
              f"(sum {sum(times['ranks_s']):.3f}s); the decoder's caches each rank hands the next: "
              + ", ".join(f"{size / 1e6:.1f} MB" for size in times["halo_bytes"]))  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the ranks spawned next need the memory this process still holds
    _print_decode(_decode_check(gpus, str(folder / "vae"), latents.numpy(), shared=shared), gpus)
    # The same ranks as the service runs them: what the actors' threads and CPU limit add, on one GPU too
    # (Ray gives an actor one torch thread per whole CPU, at least one: the service's num_cpus 0.25 gives one).
    for cpus in sorted({1, max(1, (os.cpu_count() or 1) // gpus)}):
        actors = _decode_check(
            gpus, str(folder / "vae"), latents.numpy(), shared=shared, in_actors=True, actor_cpus=cpus
        )
        _print_decode(actors, gpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the parallel replica")
    parser.add_argument("--modes", default="cfg", help="comma-separated: cfg, ulysses, cfg+ulysses")
    parser.add_argument("--steps", default="10,50", help="comma-separated step counts")
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--compare-whole", action="store_true", help="also time cfg with nothing else split")
    parser.add_argument(
        "--gpu-views", default="replica", help="comma-separated: replica, own (what each rank worker sees)"
    )
    parser.add_argument("--decode-check", action="store_true", help="time the decode alone, whole vs split")
    parser.add_argument(
        "--decode-only", action="store_true", help="only the baseline's latents and the decode check"
    )
    parser.add_argument(
        "--one-gpu-checks", action="store_true", help="only the decode/encode checks, on 1 GPU"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny model, gloo")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps_list = [int(s) for s in args.steps.split(",")]
    if args.tiny:
        args.width, args.height, args.frames, steps_list = 64, 48, 9, [2]
    modes = args.modes.split(",")
    from Wan2GP.parallel import plan_degrees

    for mode in modes:
        try:
            plan_degrees(mode, args.gpus)  # a mode that cannot split over --gpus fails now, with the reason
        except ValueError as error:
            raise SystemExit(f"bench.multi_gpu_video: --modes/--gpus: {error}") from None
    from deployments.multi_gpu import check_gpu_view

    for view in args.gpu_views.split(","):
        try:
            check_gpu_view(view)  # before any model is built, not when its replica starts
        except ValueError as error:
            raise SystemExit(f"bench.multi_gpu_video: --gpu-views: {error}") from None
    if args.one_gpu_checks:
        return one_gpu_checks(args, args.gpus)
    gpus = require_gpus(args.gpus, args.tiny, "bench.multi_gpu_video")

    tmp = Path(tempfile.mkdtemp(prefix="hwgp-mgv-"))
    models_dir, ids = prepare_models(models_root(tmp), args.tiny)
    model_id = ids["t2v"]
    baseline = _baseline(args, models_dir, model_id, steps_list)

    rows = []
    if not args.decode_only:
        start_ray(gpus)
        for mode in modes:
            for view in args.gpu_views.split(","):
                rows += _replica(args, gpus, mode, None, models_dir, model_id, steps_list, baseline, view)
        if args.compare_whole:
            rows += _replica(args, gpus, "cfg", WHOLE, models_dir, model_id, steps_list[:1], baseline)
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
    decode = None
    if args.decode_check or args.decode_only:
        folder = json.loads(Path(models_dir, f"{model_id}.json").read_text())["source"]
        latents = baseline[steps_list[0]]["latents"]
        decode = _decode_check(gpus, str(Path(folder) / "vae"), latents, shared=False)
        if not args.tiny:  # then closer to the service's replica: its VAE layout, then its GPU view too
            for isolated in (False, True):
                variant = _decode_check(
                    gpus, str(Path(folder) / "vae"), latents, False, isolated=isolated, channels_last=True
                )
                _print_decode(variant, gpus)
            # Each rank in a Ray actor seeing its own GPU, as the service's rank workers do.
            variant = _decode_check(
                gpus,
                str(Path(folder) / "vae"),
                latents,
                False,
                isolated=True,
                channels_last=True,
                in_actors=True,
            )
            _print_decode(variant, gpus)

    print(f"# one video across GPUs (Ray Serve multi-GPU replica vs the engine on 1 GPU): "
          f"{model_label(args.tiny)}, {args.width}x{args.height}, {args.frames} frames, CFG 5.0")  # fmt: skip
    print("| GPUs | mode | steps | 1 GPU s | s/video | speed-up | goal | latents rel. err | latents max-abs "
          "| MP4 frames rel. err | 2-GPU decode s | 2-GPU encode s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        goal = GOALS.get(row["steps"])
        verdict = "" if goal is None else f">= {goal}x {'met' if row['speedup'] >= goal else 'NOT met'}"
        t = row["timings"]
        print(f"| {row['gpus']} | {row['mode']} | {row['steps']} | {row['base_s']:.1f} | {row['s_per_video']:.1f} "
              f"| {row['speedup']:.2f}x | {verdict} | {row['latent_rel_error']:.2e} "
              f"| {row['latent_max_abs_error']:.2e} | {row['frame_rel_error']:.2e} | {t.get('decode', 0):.2f} "
              f"| {t.get('encode_file', 0):.2f} |")  # fmt: skip
    for steps, run in baseline.items():
        print(f"1 GPU timings at {steps} steps: {run['timings']}")
    if decode is not None:
        _print_decode(decode, gpus)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "decode": decode}, indent=2, default=str))


if __name__ == "__main__":
    main()
