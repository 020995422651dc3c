"""Travel on 2 GPUs vs 1: independent segments on two 1-GPU replicas, chained segments on one 2-GPU replica.

    python -m bench.parallel_travel [--gpus 2] [--segments 4] [--steps 6] [--frames 33] [--resolution 832x480]
    python -m bench.parallel_travel --tiny    # CPU smoke check: tiny VACE on fake GPUs

The full-size Wan2.1-VACE-1.3B architecture with random weights (bench/common.py, no downloads) serves the
VACE deployment of the running service (local Ray cluster, SQLite), in these layouts, one after the other:

- ``1gpu``: one replica on one GPU (the baseline, both modes);
- ``replicas``: ``--gpus`` replicas of one GPU each: independent segments (``chain_segments: false``) run on
  all replicas at once (chained ones cannot: each waits for its predecessor);
- ``split``: one replica spanning ``--gpus`` GPUs (``gpus_per_replica``, CFG parallel, decode and encode
  split: Wan2GP/parallel.py), each rank worker seeing all of the replica's GPUs (``gpu_view: replica``, the
  default): every segment, chained ones too, runs faster;
- ``split-own``: the same with each rank worker seeing its own GPU alone (``gpu_view: own``, the view Ray
  gives a GPU actor).

Each layout is warmed by a one-step travel, then one travel per mode is timed from POST to Complete.
Goals (issue 22, 2 GPUs vs 1): independent >= 1.9x, chained >= 1.7x.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    app_config,
    model_label,
    models_root,
    post,
    prepare_models,
    require_gpus,
    run_app,
    start_ray,
)
from hwgp_testing import free_port, wait_complete

GOALS = {"independent": 1.9, "chained": 1.7}


# Per-segment size: full (the GPU runs) and tiny (--tiny, CPU), unless given on the command line.
TRAVEL_SIZES = {
    "full": {"resolution": "832x480", "frames": 33, "steps": 6, "overlap": 8},
    "tiny": {"resolution": "64x48", "frames": 9, "steps": 2, "overlap": 4},
}


def add_travel_size_arguments(parser: argparse.ArgumentParser) -> None:
    full = TRAVEL_SIZES["full"]
    parser.add_argument("--steps", type=int, default=None, help=f"default {full['steps']} (--tiny: 2)")
    parser.add_argument(
        "--frames", type=int, default=None, help=f"frames per segment, default {full['frames']}"
    )
    parser.add_argument("--overlap", type=int, default=None, help=f"default {full['overlap']}")
    parser.add_argument("--resolution", default=None, help=f"default {full['resolution']} (--tiny: 64x48)")


def fill_travel_size(args: argparse.Namespace) -> None:
    """The sizes not given: the tiny ones with --tiny (a tiny model at full size measures the service's own
    cost of moving full-size frames), else the full ones."""
    for key, value in TRAVEL_SIZES["tiny" if args.tiny else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def anchors(folder: Path, count: int, width: int, height: int) -> list[str]:
    """``count`` distinct anchor images (a moving bright block on a changing grey)."""
    from Wan2GP.video import encode_png

    paths = []
    for i in range(count):
        image = np.full((height, width, 3), 40 * i % 255, np.uint8)
        x = (width // 8) * i % max(1, width - width // 4)
        image[height // 4 : height // 2, x : x + width // 4] = 255
        path = folder / f"anchor{i}.png"
        path.write_bytes(encode_png(image))
        paths.append(str(path))
    return paths


def segment_stages(db: str, orchestrator_id: str) -> dict[str, float]:
    """Mean seconds per stage of a run's segments, from their rows' results; ``transfer`` is the step's round
    trip less the replica's own stages (moving params and frames through Ray and Serve, and the VACE inputs'
    preparation on the replica). Independent segments sent at once also wait there for a free replica.
    A stitched run adds ``stitch``: its stitch row's seconds (once per run, after the last segment). Once per
    run too: ``start``, from the run's row made to its first segment's start (claim, inputs, rows), and
    ``finish``, from its last row's completion to its own."""
    from db.store import open_store

    with open_store(db) as store:
        rows = [t for t in store.list(limit=1000) if t.params.get("orchestrator_task_id") == orchestrator_id]
        run = store.get(orchestrator_id)
    timings = [t.result["timings"] for t in rows if t.task_type == "travel_segment" and t.result]
    if not timings:
        return {}
    names = ["guide", "step_call", "load", "text_encode", "denoise", "decode", "encode", "save"]
    names += [n for n in ("decode_chunks", "decode_handoff", "decode_gather") if n in timings[0]]  # split
    mean = {n: sum(t.get(n, 0.0) for t in timings) / len(timings) for n in names}
    replica = mean["load"] + mean["text_encode"] + mean["denoise"] + mean["decode"]
    mean["transfer"] = mean["step_call"] - replica
    for row in rows:
        if row.task_type == "travel_stitch" and row.generation_started_at and row.generation_processed_at:
            mean["stitch"] = (row.generation_processed_at - row.generation_started_at).total_seconds()
    started = [t.generation_started_at for t in rows if t.generation_started_at]
    processed = [t.generation_processed_at for t in rows if t.generation_processed_at]
    if started and processed and run.generation_processed_at:
        mean["start"] = (min(started) - run.created_at).total_seconds()
        mean["finish"] = (run.generation_processed_at - max(processed)).total_seconds()
    return mean


def layouts(gpus: int, vace_model: str, tiny: bool) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """Layout name -> (VACE deployment config, the modes timed on it)."""
    base = {"num_cpus": 1, "preload": True, "default_models": {"vace": vace_model}}
    if tiny:
        base.update(device="cpu", num_cpus=0.1)
    split = {**base, "gpus_per_replica": gpus, "parallel_mode": "cfg"}
    return {
        "1gpu": ({**base, "num_gpus": 1, "replicas": 1}, ("independent", "chained")),
        "replicas": ({**base, "num_gpus": 1, "replicas": gpus}, ("independent",)),
        "split": (split, ("chained",)),
        "split-own": ({**split, "gpu_view": "own"}, ("chained",)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--segments", type=int, default=4)
    add_travel_size_arguments(parser)
    parser.add_argument("--layouts", default="1gpu,replicas,split")
    parser.add_argument(
        "--modes", default="independent,chained", help="the travel modes timed, of each layout's"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny VACE on fake GPUs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fill_travel_size(args)
    gpus = require_gpus(args.gpus, args.tiny, "bench.parallel_travel")

    import ray
    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="hwgp-ptravel-"))
    width, height = (int(v) for v in args.resolution.split("x"))
    models_dir, ids = prepare_models(models_root(tmp), args.tiny, families=("vace",))
    travel = {"images": anchors(tmp, args.segments + 1, width, height), "prompt": "travel between the images",
              "frames": args.frames, "overlap": args.overlap, "resolution": args.resolution,
              "num_inference_steps": args.steps, "seed": 1, "model": ids["vace"]}  # fmt: skip
    port = free_port()
    walls: dict[str, dict[str, float]] = {}
    stages_by_run: dict[str, dict[str, float]] = {}
    chosen = layouts(gpus, ids["vace"], args.tiny)
    start_ray(gpus)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name in args.layouts.split(","):
        deployment, modes = chosen[name]
        config = app_config(tmp, name, {"VACE": deployment}, models_dir, args.tiny, input_dirs=[str(tmp)])
        client = run_app(config, port)
        # Warm-up: a one-step independent travel touches every replica (model resident, kernels hot).
        warm = {**travel, "chain_segments": False, "num_inference_steps": 1}
        wait_complete(client, post(client, "travel_orchestrator", warm), timeout_s=900)
        walls[name] = {}
        for mode in (m for m in modes if m in args.modes.split(",")):
            start = time.perf_counter()
            task = post(client, "travel_orchestrator", {**travel, "chain_segments": mode == "chained"})
            wait_complete(client, task, timeout_s=900)
            walls[name][mode] = time.perf_counter() - start
            stages = segment_stages(config["db"], task)
            print(f"{name}: {mode} travel {walls[name][mode]:.1f}s; per segment: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)  # fmt: skip
            stages_by_run[f"{name}/{mode}"] = stages
        serve.delete("hwgp")
        client.close()
    serve.shutdown()
    ray.shutdown()

    print(f"# travel, {args.segments} segments x {args.frames} frames at {args.resolution}, {args.steps} steps, "
          f"CFG 5.0: {model_label(args.tiny, 'vace')}; {gpus} GPUs vs 1")  # fmt: skip
    print("| mode | 1 GPU s | layout on 2 GPUs | s | speed-up | goal |")
    print("|---|---|---|---|---|---|")
    base = walls.get("1gpu", {})
    for name, runs in walls.items():
        if name == "1gpu":
            continue
        for mode, seconds in runs.items():
            if mode not in base:
                continue
            speedup = base[mode] / seconds
            verdict = "met" if speedup >= GOALS[mode] else "NOT met"
            print(f"| {mode} | {base[mode]:.1f} | {name} | {seconds:.1f} | {speedup:.2f}x "
                  f"| >= {GOALS[mode]}x {verdict} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({**walls, "segment_stages": stages_by_run}, indent=2))


if __name__ == "__main__":
    main()
