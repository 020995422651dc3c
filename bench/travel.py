"""Travel between images: chained vs independent segments, with 1 and 2 VACE replicas, tiny models.

    python -m bench.travel [--segments 3] [--steps 30] [--resolution 128x96] [--frames 17]

Each configuration runs a fresh application on a local Ray cluster (fake GPUs, SQLite) and times one
travel from POST to Complete after a warm-up task. Independent segments can use both replicas at
once; chained ones cannot. Not a test: the numbers go in notes and docs.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import httpx
import numpy as np

from hwgp_testing import free_port, wait_complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", default="128x96")
    parser.add_argument("--frames", type=int, default=17)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app
    from Wan2GP.video import encode_png

    tmp = tempfile.mkdtemp(prefix="hwgp-travel-")
    width, height = (int(v) for v in args.resolution.split("x"))
    anchors = []
    for i in range(args.segments + 1):
        image = np.full((height, width, 3), 40 * i % 255, np.uint8)
        image[height // 4 : height // 2, 8 * i : 8 * i + width // 4] = 255
        path = f"{tmp}/anchor{i}.png"
        with open(path, "wb") as f:
            f.write(encode_png(image))
        anchors.append(path)
    travel = {"images": anchors, "prompt": "travel", "frames": args.frames, "overlap": 4,
              "resolution": args.resolution, "num_inference_steps": args.steps, "seed": 1}  # fmt: skip

    ray.init(num_cpus=os.cpu_count(), num_gpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    results = {}
    for replicas in (1, 2):
        small = {"num_gpus": 0.2, "num_cpus": 0.05}
        config = {
            "db": f"sqlite:///{tmp}/tasks-{replicas}.db",
            "storage": {"root": f"{tmp}/files"},
            "input_dirs": [tmp],
            "models": "tiny",
            "deployments": {"T2V": small, "VACE": {**small, "replicas": replicas}, "Flux": small},
            "ingress": {"poll_interval_s": 0.05},
        }
        serve.run(build_app(config), name="hwgp", route_prefix="/")
        warm = {**travel, "num_inference_steps": 1, "chain_segments": False}
        wait_complete(
            client,
            client.post("/tasks", json={"task_type": "travel_orchestrator", "params": warm}).json()["id"],
        )
        for chained in (True, False):
            start = time.perf_counter()
            body = {"task_type": "travel_orchestrator", "params": {**travel, "chain_segments": chained}}
            wait_complete(client, client.post("/tasks", json=body).json()["id"])
            results[(replicas, chained)] = time.perf_counter() - start
        serve.delete("hwgp")
    serve.shutdown()
    ray.shutdown()

    print(f"# travel, {args.segments} segments of {args.frames} frames at {args.resolution}, {args.steps} steps, "
          f"tiny VACE on CPU; {platform.node()}, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'mode':12} {'1 replica':>10} {'2 replicas':>11} {'speed-up':>9}")
    for chained in (True, False):
        one, two = results[(1, chained)], results[(2, chained)]
        print(f"{'chained' if chained else 'independent':12} {one:>9.1f}s {two:>10.1f}s {one / two:>8.2f}x")
    print(f"independent vs chained on 2 replicas: {results[(2, True)] / results[(2, False)]:.2f}x")


if __name__ == "__main__":
    main()
