"""The pipelined replica (issue 21.5) on CPU with the tiny models: how long the T2V replica is busy per
task, and how fast a queue drains, with the encode on the replica (before) or in a CPU Ray task (after).

    python -m bench.pipelining [--tasks 12] [--resolution 320x192] [--frames 17]

Starts a local Ray cluster (one fake GPU) with the T2V deployment on SQLite, queues --tasks tasks at once
and waits for them all. The replica's busy span per task comes from its `recent` stats where it reports
them (after), else from the task's engine stages, encode included (before: the replica encoded). Run it on
the commit before pipelining for the baseline. Not a test: the numbers go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from hwgp_testing import running_app, wait_complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--resolution", default="320x192")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    from db.store import open_store

    tmp = tempfile.mkdtemp(prefix="hwgp-bench-pipelining-")
    db = f"sqlite:///{tmp}/tasks.db"
    config = {
        "db": db,
        "storage": {"root": f"{tmp}/files"},
        "models": "tiny",
        "deployments": {"T2V": {"num_gpus": 1, "num_cpus": 0.1}},
        "ingress": {"poll_interval_s": 0.05, "progress_interval_s": 1.0},
    }
    params = {"prompt": "a boat at dusk", "resolution": args.resolution, "video_length": args.frames,
              "num_inference_steps": args.steps}  # fmt: skip
    with running_app(config, num_gpus=1, num_cpus=os.cpu_count() or 2) as client:

        def post(seed: int) -> str:
            return client.post(
                "/tasks", json={"task_type": "t2v", "params": {**params, "seed": seed}}
            ).json()["id"]

        wait_complete(client, post(1000), poll_s=0.02)  # warm: model loaded, encode worker started
        start = time.perf_counter()
        ids = [post(seed) for seed in range(args.tasks)]
        for task_id in ids:
            wait_complete(client, task_id, poll_s=0.02)
        drain = time.perf_counter() - start
        replica = client.get("/replicas").json()["T2V"]

    with open_store(db) as store:
        results = [store.get(task_id).result for task_id in ids]
    recent = {entry["task_id"]: entry for entry in replica.get("recent", [])}
    # The engine's stages the replica ran: the encode too before pipelining.
    replica_stages = ("text_encode", "denoise", "decode") + (() if recent else ("encode",))
    busy, stages, encode = [], [], []
    for task_id, result in zip(ids, results, strict=True):
        timings = result["timings"]
        encode.append(timings["encode"])
        stages.append(sum(timings[s] for s in replica_stages))
        if task_id in recent:
            busy.append(recent[task_id]["finished"] - recent[task_id]["started"])
    where = "CPU Ray task" if recent else "replica"
    print(f"# pipelining, t2v tiny {args.resolution} x{args.frames} frames, {args.steps} steps, CPU; "
          f"{platform.node()}, {os.cpu_count()} cores; encode on the {where}")  # fmt: skip
    print(
        f"replica's engine stages, median: {statistics.median(stages) * 1000:8.1f} ms  ({'+'.join(replica_stages)})"
    )
    if busy:
        print(f"replica busy span, median:       {statistics.median(busy) * 1000:8.1f} ms")
    print(f"encode per task, median:         {statistics.median(encode) * 1000:8.1f} ms")
    print(f"{args.tasks} queued tasks drained in {drain:.2f} s: {args.tasks / drain * 60:.0f} tasks/minute")

    from Wan2GP.engine import Engine

    if hasattr(Engine, "render"):  # after pipelining: the same A/B in one process, without Ray
        in_process(Engine, params, repeats=10)


def in_process(engine_class: type, params: dict, repeats: int) -> None:
    """The same A/B without Ray, alternating in one process: what the replica's thread holds per task
    with the encode (`generate`: before) and without it (`render`: after)."""
    import torch

    torch.set_num_threads(1)  # one thread: less noise from whatever else shares the machine
    engine = engine_class(default_models={"t2v": "tiny-t2v"}, device="cpu")
    engine.generate("t2v", {**params, "seed": 0})  # warm
    times: dict[str, list[float]] = {"generate": [], "render": []}
    for seed in range(repeats):
        for name in times:
            start = time.perf_counter()
            getattr(engine, name)("t2v", {**params, "seed": seed})
            times[name].append(time.perf_counter() - start)
    before, after = statistics.median(times["generate"]), statistics.median(times["render"])
    print(f"in process, median of {repeats}: render+encode {before * 1000:.1f} ms, render {after * 1000:.1f} ms "
          f"({(1 - after / before) * 100:.0f}% less replica time)")  # fmt: skip


if __name__ == "__main__":
    main()
