"""Replica scaling: tasks/hour of the running service with N one-GPU T2V replicas vs 1, in the same run.

    python -m bench.scale_out [--gpus N] [--tasks-per-gpu 4] [--steps 10] [--width 832 --height 480 --frames 81]
    python -m bench.scale_out --steps 50 --tasks-per-gpu 8 --measure-first 2   # 16 queued, first 2·N timed
    python -m bench.scale_out --tiny          # CPU smoke check: tiny model, fake GPUs

The full-size Wan2.1-T2V-1.3B architecture with random weights (built here, no downloads: see
bench/common.py) is served by a local Ray cluster with the application on SQLite. For 1 and then N
replicas of ``num_gpus: 1`` it warms every replica (``--warm-steps``), posts tasks-per-gpu·N tasks over HTTP
and times the first POST to the last Complete. With ``--measure-first K`` it times the first POST to the
K·N-th Complete instead (the queue stays full meanwhile) and cancels the rest: the throughput of a long queue
in a bounded time (16 tasks at 50 steps take ≈ 18 min on one replica, a device call at most 10).
Goal (issue 22): throughput(N) / throughput(1) >= 0.975·N (1.95x on 2 GPUs).
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
    parser.add_argument("--warm-steps", type=int, default=2, help="steps of each replica's warm-up task")
    parser.add_argument(
        "--measure-first", type=int, default=None, metavar="K", help="time the first K·N completions only"
    )
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
        warm = {**params, "num_inference_steps": args.warm_steps}
        for task_id in [post(client, "t2v", warm) for _ in range(replicas)]:
            wait_complete(client, task_id)
        start = time.perf_counter()
        ids_posted = [post(client, "t2v", {**params, "seed": 100 + i}) for i in range(tasks)]
        timed = tasks if args.measure_first is None else min(tasks, args.measure_first * replicas)
        wait_first_complete(client, ids_posted, timed)
        wall = time.perf_counter() - start
        for task_id in ids_posted:  # those left in the queue (none without --measure-first)
            client.post(f"/tasks/{task_id}/cancel")
        results.append({"replicas": replicas, "tasks": tasks, "timed": timed, "wall_s": wall,
                        "tasks_per_hour": timed / wall * 3600})  # fmt: skip
        print(f"{replicas} replica(s): {timed} of {tasks} queued tasks done in {wall:.1f}s", flush=True)
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
    print("| replicas (1 GPU each) | tasks queued | timed | wall s | tasks/hour | vs 1 replica |")
    print("|---|---|---|---|---|---|")
    for run in results:
        speed = run["tasks_per_hour"] / one["tasks_per_hour"]
        print(f"| {run['replicas']} | {run['tasks']} | {run['timed']} | {run['wall_s']:.1f} "
              f"| {run['tasks_per_hour']:.0f} | {speed:.2f}x |")  # fmt: skip
    goal = GOAL_FRACTION * gpus
    print(f"ratio {ratio:.2f} for N={gpus}; goal >= {goal:.2f} ({'met' if ratio >= goal else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratio": ratio, "gpus": gpus}, indent=2))


def wait_first_complete(client, task_ids: list[str], count: int, timeout_s: float = 3600) -> None:
    """Return once ``count`` of ``task_ids`` are Complete; RuntimeError when one ends otherwise."""
    deadline = time.monotonic() + timeout_s
    done: set[str] = set()
    while len(done) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(done)} of {count} tasks complete after {timeout_s:.0f}s")
        for task_id in task_ids:
            if task_id in done:
                continue
            task = client.get(f"/tasks/{task_id}").json()
            if task["status"] == "Complete":
                done.add(task_id)
            elif task["status"] in ("Failed", "Cancelled"):
                raise RuntimeError(f"task {task_id}: {task['status']}: {task.get('error_message')}")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
