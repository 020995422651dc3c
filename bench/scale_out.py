"""Replica scaling: tasks/hour of the running service with N one-GPU T2V replicas vs 1, in the same run.

    python -m bench.scale_out [--gpus N] [--tasks-per-gpu 4] [--steps 10] [--width 832 --height 480 --frames 81]
    python -m bench.scale_out --tiny          # CPU smoke check: tiny model, fake GPUs

The full-size Wan2.1-T2V-1.3B architecture with random weights (built here, no downloads: see
bench/common.py) is served by a local Ray cluster with the application on SQLite. For 1 and then N
replicas of ``num_gpus: 1`` it warms every replica, posts 4·N tasks over HTTP and times the first POST to the
last Complete. Goal (issue 22): throughput(N) / throughput(1) >= 0.975·N (1.95x on 2 GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import (
    PROMPT,
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

GOAL_FRACTION = 0.975


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpus", type=int, default=None, help="N (default: every visible GPU; 2 with --tiny)"
    )
    parser.add_argument("--tasks-per-gpu", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny model on fake GPUs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tiny:
        args.width, args.height, args.frames, args.steps = 64, 48, 9, 2
    if args.gpus is None:
        import torch

        args.gpus = 2 if args.tiny else max(torch.cuda.device_count(), 2)
    gpus = require_gpus(max(args.gpus, 2), args.tiny, "bench.scale_out")

    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="hwgp-scale-"))
    models_dir, ids = prepare_models(models_root(tmp), args.tiny)
    start_ray(gpus)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    params = {"model": ids["t2v"], "prompt": PROMPT, "resolution": f"{args.width}x{args.height}",
              "video_length": args.frames, "num_inference_steps": args.steps, "seed": 1}  # fmt: skip
    tasks = args.tasks_per_gpu * gpus
    results = []
    for replicas in (1, gpus):
        family = {"num_gpus": 1, "num_cpus": 1, "replicas": replicas, "preload": True,
                  "default_models": {"t2v": ids["t2v"]}}  # fmt: skip
        if args.tiny:
            family.update(device="cpu", num_cpus=0.1)
        client = run_app(app_config(tmp, f"r{replicas}", {"T2V": family}, models_dir, args.tiny), port)
        # Warm every replica (model resident, kernels compiled) before timing.
        for task_id in [post(client, "t2v", params) for _ in range(replicas)]:
            wait_complete(client, task_id)
        start = time.perf_counter()
        ids_posted = [post(client, "t2v", {**params, "seed": 100 + i}) for i in range(tasks)]
        for task_id in ids_posted:
            wait_complete(client, task_id)
        wall = time.perf_counter() - start
        results.append(
            {"replicas": replicas, "tasks": tasks, "wall_s": wall, "tasks_per_hour": tasks / wall * 3600}
        )
        print(f"{replicas} replica(s): {tasks} tasks in {wall:.1f}s", flush=True)
        serve.delete("hwgp")
        client.close()
    serve.shutdown()
    import ray

    ray.shutdown()

    one, many = results
    ratio = many["tasks_per_hour"] / one["tasks_per_hour"]
    what = model_label(args.tiny)
    print(
        f"# scale-out: {what}, {args.width}x{args.height}, {args.frames} frames, {args.steps} steps, {tasks} tasks"
    )
    print("| replicas (1 GPU each) | tasks | wall s | tasks/hour | vs 1 replica |")
    print("|---|---|---|---|---|")
    for run in results:
        speed = run["tasks_per_hour"] / one["tasks_per_hour"]
        print(
            f"| {run['replicas']} | {run['tasks']} | {run['wall_s']:.1f} | {run['tasks_per_hour']:.0f} | {speed:.2f}x |"
        )
    goal = GOAL_FRACTION * gpus
    print(f"ratio {ratio:.2f} for N={gpus}; goal >= {goal:.2f} ({'met' if ratio >= goal else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratio": ratio, "gpus": gpus}, indent=2))


if __name__ == "__main__":
    main()
