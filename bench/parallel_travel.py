"""Parallel travel: 4 segments, independent (``chain_segments: false``) vs chained, on 2 GPUs vs 1 GPU.

    python -m bench.parallel_travel [--gpus 2] [--segments 4] [--steps 10] [--frames 49] [--resolution 832x480]
    python -m bench.parallel_travel --tiny    # CPU smoke check: tiny VACE on fake GPUs

The full-size Wan2.1-VACE-1.3B architecture with random weights (no downloads) runs in the VACE family
deployment of the service (local Ray cluster, SQLite), with 1 replica and then ``--gpus`` replicas of
``num_gpus: 1``. For each, after a warm-up travel that touches every replica, one travel in each mode is
timed from POST to Complete. Independent segments can run on all replicas at once; chained ones wait for
their predecessor. Goal: independent travel >= 1.8x faster on 2 GPUs than on 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.scale_out import post, prepare_models, require_gpus, run_app, start_ray
from hwgp_testing import free_port, wait_complete


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=49, help="frames per segment")
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--resolution", default="832x480")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny VACE on fake GPUs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tiny:
        args.resolution, args.frames, args.steps, args.overlap = "64x48", 9, 2, 4
    gpus = require_gpus(args.gpus, args.tiny, "bench.parallel_travel")

    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="hwgp-ptravel-"))
    width, height = (int(v) for v in args.resolution.split("x"))
    models_dir, ids = prepare_models(tmp, args.tiny, families=("vace",))
    travel = {"images": anchors(tmp, args.segments + 1, width, height), "prompt": "travel between the images",
              "frames": args.frames, "overlap": args.overlap, "resolution": args.resolution,
              "num_inference_steps": args.steps, "seed": 1, "model": ids["vace"]}  # fmt: skip
    start_ray(gpus, args.tiny)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    walls: dict[tuple[int, bool], float] = {}
    for replicas in (1, gpus):
        family = {"num_gpus": 1, "num_cpus": 1, "replicas": replicas, "preload": True,
                  "default_models": {"vace": ids["vace"]}}  # fmt: skip
        if args.tiny:
            family.update(device="cpu", num_cpus=0.1)
        config = {
            "db": f"sqlite:///{tmp}/tasks-{replicas}.db",
            "storage": {"root": str(tmp / "files")},
            "input_dirs": [str(tmp)],
            "models": "tiny" if args.tiny else "real",
            "models_dir": models_dir,
            "deployments": {"VACE": family},
            "ingress": {"poll_interval_s": 0.05},
        }
        client = run_app(config, port)
        # Warm-up: an independent travel puts a segment on every replica (model resident, kernels hot).
        wait_complete(client, post(client, "travel_orchestrator", {**travel, "chain_segments": False}))
        for chained in (False, True):
            start = time.perf_counter()
            wait_complete(client, post(client, "travel_orchestrator", {**travel, "chain_segments": chained}))
            walls[(replicas, chained)] = time.perf_counter() - start
            mode = "chained" if chained else "independent"
            print(f"{replicas} GPU(s), {mode}: {walls[(replicas, chained)]:.1f}s", flush=True)
        serve.delete("hwgp")
        client.close()
    serve.shutdown()
    import ray

    ray.shutdown()

    what = "tiny VACE, CPU (smoke check)" if args.tiny else "Wan2.1-VACE-1.3B architecture, random weights"
    print(
        f"# travel, {args.segments} segments of {args.frames} frames at {args.resolution}, {args.steps} steps: {what}"
    )
    print(f"| mode | 1 GPU s | {gpus} GPUs s | speed-up |")
    print("|---|---|---|---|")
    for chained in (False, True):
        one, many = walls[(1, chained)], walls[(gpus, chained)]
        print(f"| {'chained' if chained else 'independent'} | {one:.1f} | {many:.1f} | {one / many:.2f}x |")
    speedup = walls[(1, False)] / walls[(gpus, False)]
    print(
        f"independent on {gpus} GPUs vs 1: {speedup:.2f}x; goal >= 1.8x ({'met' if speedup >= 1.8 else 'NOT met'})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {f"{r}gpu_{'chained' if c else 'independent'}": w for (r, c), w in walls.items()}, indent=2
            )
        )


if __name__ == "__main__":
    main()
