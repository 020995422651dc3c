"""Replica scaling: tasks/hour of the running service with N one-GPU T2V replicas vs 1, in the same run.

    python -m bench.scale_out [--gpus N] [--tasks-per-gpu 4] [--steps 10] [--width 832 --height 480 --frames 81]
    python -m bench.scale_out --tiny          # CPU smoke check: tiny model, fake GPUs

The full-size Wan2.1-T2V-1.3B architecture with random weights (built here, no downloads: see
bench/engine_gpu.py) is served by a local Ray cluster with the application on SQLite. For 1 and then N
replicas of ``num_gpus: 1`` it warms every replica, posts 4·N tasks over HTTP and times the first POST to the
last Complete. Goal: throughput(N) / throughput(1) >= 0.95·N.

Also the shared helpers of bench/parallel_travel.py and bench/multi_gpu_video.py (GPU check, model build,
service start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hwgp_testing import free_port, wait_complete

T2V_MODEL = "bench-wan2.1-t2v-1.3b"
VACE_MODEL = "bench-wan2.1-vace-1.3b"
PROMPT = "a cat walking in the city at night, cinematic"


def require_gpus(needed: int, tiny: bool, script: str) -> int:
    """The GPUs to use; exit at once with a clear message when fewer than ``needed`` are present."""
    if tiny:
        return needed  # fake GPUs of a local Ray cluster, models on CPU
    import torch

    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if present < needed:
        sys.exit(
            f"{script}: needs {needed} GPUs, found {present}. Run it on a multi-GPU machine "
            f"(e.g. the device kind nvidia-h200-x{max(2, needed)}), or pass --tiny for a CPU smoke check."
        )
    return needed


def build_vace(folder: Path) -> None:
    """A random-weight pipeline with the Wan2.1-VACE-1.3B architecture (transformer bf16, VAE fp32)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from bench.engine_gpu import WAN_1_3B
    from Wan2GP.tiny import build_t5_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        # Wan2.1-VACE-1.3B: the T2V 1.3B blocks plus VACE blocks on every other layer, 96 control channels.
        transformer = WanVACETransformer3DModel(
            **WAN_1_3B, vace_layers=list(range(0, 30, 2)), vace_in_channels=96
        ).to(torch.bfloat16)
        vae = AutoencoderKLWan()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=256, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2)
    ).to(torch.bfloat16)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    WanVACEPipeline(
        tokenizer=build_t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    ).save_pretrained(str(folder))


def prepare_models(root: Path, tiny: bool, families: tuple[str, ...] = ("t2v",)) -> tuple[str, dict]:
    """``(models_dir, {family: model_id})``: a model JSON per family under ``root/models`` whose weights are
    full-size random ones built under ``root``, or (``tiny``) the tiny models' folders: the service loads
    them like any local weights, through the same catalog path."""
    from bench.engine_gpu import build

    models_dir = root / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    ids = {}
    for family in families:
        model_id, pipeline = (
            (T2V_MODEL, "WanPipeline") if family == "t2v" else (VACE_MODEL, "WanVACEPipeline")
        )
        if tiny:
            from Wan2GP.tiny import ensure_tiny_models

            folder, dtype = ensure_tiny_models() / family, "float32"
        else:
            folder, dtype = root / model_id, "bfloat16"
            start = time.perf_counter()
            (build if family == "t2v" else build_vace)(folder)
            print(f"built {model_id} (random weights) in {time.perf_counter() - start:.0f}s", flush=True)
        definition = {
            "id": model_id,
            "family": family,
            "pipeline": pipeline,
            "source": str(folder),
            "dtype": dtype,
            "component_dtypes": {"vae": "float32"},
            "defaults": {"num_inference_steps": 10, "guidance_scale": 5.0, "flow_shift": 3.0,
                         "width": 832, "height": 480, "fps": 16, "frames": 81},
        }  # fmt: skip
        (models_dir / f"{model_id}.json").write_text(json.dumps(definition, indent=2))
        ids[family] = model_id
    if not tiny:
        import torch

        torch.cuda.empty_cache()  # the build ran on GPU 0; leave it to the replicas
    return str(models_dir), ids


def start_ray(gpus: int, tiny: bool) -> None:
    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )


def run_app(config: dict[str, Any], port: int) -> httpx.Client:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(config), name="hwgp", route_prefix="/")
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)


def post(client: httpx.Client, task_type: str, params: dict) -> str:
    response = client.post("/tasks", json={"task_type": task_type, "params": params})
    response.raise_for_status()
    return response.json()["id"]


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
    models_dir, ids = prepare_models(tmp, args.tiny)
    start_ray(gpus, args.tiny)
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
        config = {
            "db": f"sqlite:///{tmp}/tasks-{replicas}.db",
            "storage": {"root": str(tmp / "files")},
            "models": "tiny" if args.tiny else "real",
            "models_dir": models_dir,
            "deployments": {"T2V": family},
            "ingress": {"poll_interval_s": 0.05},
        }
        client = run_app(config, port)
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
    what = "tiny model, CPU (smoke check)" if args.tiny else "Wan2.1-T2V-1.3B architecture, random weights"
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
    print(
        f"ratio {ratio:.2f} for N={gpus}; goal >= {0.95 * gpus:.2f} ({'met' if ratio >= 0.95 * gpus else 'NOT met'})"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratio": ratio, "gpus": gpus}, indent=2))


if __name__ == "__main__":
    main()
