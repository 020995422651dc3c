"""One video split across GPUs: seconds per video with the multi-GPU replica on 2 (and 4) GPUs vs 1 GPU.

    python -m bench.multi_gpu_video [--gpus 2] [--modes cfg,ulysses] [--steps 10] [--frames 81]
    python -m bench.multi_gpu_video --gpus 4 --modes ulysses,cfg+ulysses
    python -m bench.multi_gpu_video --direct  # the same runs without Ray: one process per GPU (mp.spawn)
    python -m bench.multi_gpu_video --tiny    # CPU smoke check: tiny model, gloo, fake GPUs

The full-size Wan2.1-T2V-1.3B architecture with random weights (no downloads) at 832x480, 81 frames. The
1-GPU baseline is a normal one-GPU replica (``GenerationDeployment``); each parallel run is a
``MultiGpuGenerationDeployment`` whose replica spans ``--gpus`` GPUs (one worker actor per GPU, NCCL with
NVLink multicast off). With ``--direct`` the same engine runs in plain processes (``torch.multiprocessing``,
one per GPU, :mod:`Wan2GP.parallel` over NCCL) instead of Ray, for a machine without Ray. Every
configuration is warmed once, then timed over ``--repeats`` videos (median). Reports s/video, speed-up
(goal >= 1.8x on 2 GPUs) and the relative error of the decoded frames against the 1-GPU output (same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.scale_out import PROMPT, prepare_models, require_gpus, start_ray
from hwgp_testing import free_port


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _row(gpus: int, mode: str, seconds: float, base_s: float, frames, base_frames) -> dict:
    error = relative_error(frames, base_frames)
    print(
        f"{gpus} GPU(s) {mode}: {seconds:.1f}s/video, {base_s / seconds:.2f}x, rel. error {error:.2e}",
        flush=True,
    )
    return {
        "gpus": gpus,
        "mode": mode,
        "s_per_video": seconds,
        "speedup": base_s / seconds,
        "rel_error": error,
    }


# ---- through Ray Serve: the multi-GPU replica ---------------------------------------------------------------


def _stream(handle, params: dict) -> tuple[float, object]:
    start = time.perf_counter()
    events = list(handle.generate.options(stream=True).remote("t2v", params, "bench"))
    seconds = time.perf_counter() - start
    last = events[-1]
    if last["event"] != "done":
        raise RuntimeError(f"generation failed: {last}")
    return seconds, last["artifact"]


def _time(handle, params: dict, repeats: int) -> tuple[float, object]:
    _stream(handle, params)  # warm: CUDA kernels, NCCL communicators
    runs = [_stream(handle, params) for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


def _run_serve(args, gpus: int, modes: list[str], models_dir: str, model_id: str, params: dict) -> list[dict]:
    import ray
    from ray import serve

    from deployments.generation import GenerationDeployment
    from deployments.multi_gpu import MultiGpuGenerationDeployment, multi_gpu_options
    from Wan2GP.video import decode_video

    start_ray(gpus, args.tiny)
    device = "cpu" if args.tiny else None
    cpus = 0.5 if args.tiny else 2.0
    single = GenerationDeployment.options(ray_actor_options={"num_gpus": 1, "num_cpus": cpus}).bind(
        family="T2V", default_models={"t2v": model_id}, device=device, models_dir=models_dir, preload=model_id
    )
    handle = serve.run(single, name="single", route_prefix=None)
    base_s, base_artifact = _time(handle, params, args.repeats)
    base_frames, _ = decode_video(base_artifact.data)
    rows = [_row(1, "single", base_s, base_s, base_frames, base_frames)]
    serve.delete("single")
    for mode in modes:
        replica = MultiGpuGenerationDeployment.options(**multi_gpu_options(gpus, cpus_per_rank=cpus)).bind(
            family="T2V",
            default_models={"t2v": model_id},
            world_size=gpus,
            mode=mode,
            device=device,
            models_dir=models_dir,
            cpus_per_rank=cpus,
            preload=model_id,
        )
        handle = serve.run(replica, name=f"multi-{mode}", route_prefix=None)
        seconds, artifact = _time(handle, params, args.repeats)
        rows.append(_row(gpus, mode, seconds, base_s, decode_video(artifact.data)[0], base_frames))
        serve.delete(f"multi-{mode}")
    serve.shutdown()
    ray.shutdown()
    return rows


# ---- without Ray: one plain process per GPU ------------------------------------------------------------------


def _direct_rank(
    rank: int,
    world_size: int,
    port: int,
    mode: str | None,
    device_kind: str,
    models_dir: str,
    params: dict,
    repeats: int,
    out: str,
) -> None:
    """One process of a ``--direct`` run: rank ``rank`` of ``mode`` (None: the plain 1-GPU engine)."""
    import torch

    from Wan2GP.catalog import Catalog
    from Wan2GP.engine import Engine
    from Wan2GP.parallel import init_distributed, run_parallel_generation

    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    if mode is not None:
        device = str(init_distributed(rank, world_size, "127.0.0.1", port, device=device))
    engine = Engine(device=device, catalog=Catalog.load(models_dir), lora_dirs=[])

    def once() -> tuple[float, object]:
        if device_kind == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if mode is None:
            artifact = engine.generate("t2v", params)
        else:
            artifact = run_parallel_generation(engine, "t2v", params, mode)
        if device_kind == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, artifact

    once()  # warm: model load, kernels, NCCL communicators
    runs = [once() for _ in range(repeats)]
    if rank == 0:
        Path(out, "video.mp4").write_bytes(runs[-1][1].data)
        Path(out, "seconds.json").write_text(json.dumps([s for s, _ in runs]))
    if mode is not None:
        torch.distributed.destroy_process_group()


def _direct(mode: str | None, world_size: int, device_kind: str, models_dir: str, params: dict, repeats: int):
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="hwgp-mgv-rank-")
    args = (world_size, free_port(), mode, device_kind, models_dir, params, repeats, out)
    mp.spawn(_direct_rank, args=args, nprocs=world_size, join=True)
    seconds = statistics.median(json.loads(Path(out, "seconds.json").read_text()))
    return seconds, Path(out, "video.mp4").read_bytes()


def _run_direct(
    args, gpus: int, modes: list[str], models_dir: str, model_id: str, params: dict
) -> list[dict]:
    from Wan2GP.video import decode_video

    device_kind = "cpu" if args.tiny else "cuda"
    base_s, data = _direct(None, 1, device_kind, models_dir, params, args.repeats)
    base_frames, _ = decode_video(data)
    rows = [_row(1, "single", base_s, base_s, base_frames, base_frames)]
    for mode in modes:
        seconds, data = _direct(mode, gpus, device_kind, models_dir, params, args.repeats)
        rows.append(_row(gpus, mode, seconds, base_s, decode_video(data)[0], base_frames))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the parallel replica (2 or 4)")
    parser.add_argument("--modes", default=None, help="comma-separated: cfg, ulysses, cfg+ulysses")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--direct", action="store_true", help="plain processes (mp.spawn) instead of Ray Serve"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny model, gloo")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tiny:
        args.width, args.height, args.frames, args.steps, args.repeats = 64, 48, 9, 2, 1
    modes = (args.modes or ("cfg,ulysses" if args.gpus == 2 else "ulysses,cfg+ulysses")).split(",")
    from Wan2GP.parallel import plan_degrees

    for mode in modes:
        try:
            plan_degrees(mode, args.gpus)  # a mode that cannot split over --gpus fails now, with the reason
        except ValueError as error:
            raise SystemExit(f"bench.multi_gpu_video: --modes/--gpus: {error}") from None
    gpus = require_gpus(args.gpus, args.tiny, "bench.multi_gpu_video")

    tmp = Path(tempfile.mkdtemp(prefix="hwgp-mgv-"))
    models_dir, ids = prepare_models(tmp, args.tiny)
    model_id = ids["t2v"]
    params = {"model": model_id, "prompt": PROMPT, "resolution": f"{args.width}x{args.height}",
              "video_length": args.frames, "num_inference_steps": args.steps, "guidance_scale": 5.0,
              "seed": 3}  # fmt: skip
    runner = _run_direct if args.direct else _run_serve
    rows = runner(args, gpus, modes, models_dir, model_id, params)

    how = "plain processes" if args.direct else "Ray Serve multi-GPU replica"
    model = (
        "tiny model, CPU + gloo (smoke check)"
        if args.tiny
        else "Wan2.1-T2V-1.3B architecture, random weights"
    )
    print(f"# one video across GPUs ({how}): {model}, {args.width}x{args.height}, {args.frames} frames, "
          f"{args.steps} steps, CFG 5.0")  # fmt: skip
    print("| GPUs | mode | s/video | speed-up | rel. error vs 1 GPU (decoded frames) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['gpus']} | {row['mode']} | {row['s_per_video']:.1f} | {row['speedup']:.2f}x "
              f"| {row['rel_error']:.2e} |")  # fmt: skip
    if gpus == 2:
        best = max(row["speedup"] for row in rows[1:])
        print(f"best speed-up on 2 GPUs {best:.2f}x; goal >= 1.8x ({'met' if best >= 1.8 else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
