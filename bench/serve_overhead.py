"""What the service adds around a generation: POST → Complete latency and queue throughput,
against calling the engine directly, in the same run, with the tiny models on CPU.

    python -m bench.serve_overhead [--tasks 200] [--task-type flux]

Starts a local Ray cluster with the application on SQLite, measures one-at-a-time latency
(median of --single runs) and the wall time to drain --tasks queued tasks, then the same
engine call in this process. Not a test: the numbers go in notes and docs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import httpx

from hwgp_testing import free_port, wait_complete

PARAMS = {"prompt": "a red square", "resolution": "32x32", "num_inference_steps": 2, "seed": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--single", type=int, default=20)
    parser.add_argument("--task-type", default="flux")
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app
    from Wan2GP.engine import Engine

    tmp = tempfile.mkdtemp(prefix="hwgp-bench-")
    ray.init(num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    family = {"num_gpus": 0.3, "num_cpus": 0.1}
    config = {
        "db": f"sqlite:///{tmp}/tasks.db",
        "storage": {"root": f"{tmp}/files"},
        "models": "tiny",
        "deployments": {"T2V": family, "VACE": family, "Flux": family},
        "ingress": {"poll_interval_s": 0.05, "progress_interval_s": 1.0},
    }
    serve.run(build_app(config), name="hwgp", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def post() -> str:
        return client.post("/tasks", json={"task_type": args.task_type, "params": PARAMS}).json()["id"]

    wait_complete(client, post(), poll_s=0.01)  # warm: model loaded, code paths hot
    latencies = []
    for _ in range(args.single):
        start = time.perf_counter()
        wait_complete(client, post(), poll_s=0.01)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    ids = [post() for _ in range(args.tasks)]
    for task_id in ids:
        wait_complete(client, task_id, poll_s=0.01)
    drain = time.perf_counter() - start
    serve.shutdown()
    ray.shutdown()

    engine = Engine(default_models={"flux": "tiny-flux", "t2v": "tiny-t2v", "vace": "tiny-vace"})
    engine.generate(args.task_type, PARAMS)
    direct = []
    for _ in range(args.single):
        start = time.perf_counter()
        engine.generate(args.task_type, PARAMS)
        direct.append(time.perf_counter() - start)

    served, bare = statistics.median(latencies), statistics.median(direct)
    print(
        f"# serve overhead, {args.task_type} on tiny models, CPU; {platform.node()}, {os.cpu_count()} cores"
    )
    print(f"engine direct, median of {args.single}:      {bare * 1000:8.1f} ms")
    print(
        f"POST -> Complete, median of {args.single}:   {served * 1000:8.1f} ms   ({served / bare:.1f}x the engine call)"
    )
    print(f"overhead per task:                  {(served - bare) * 1000:8.1f} ms")
    print(
        f"{args.tasks} queued tasks drained in {drain:.1f} s: {args.tasks / drain * 60:.0f} tasks/minute "
        f"(engine alone: {60 / bare:.0f} tasks/minute)"
    )


if __name__ == "__main__":
    main()
