"""One GPU through the running service: POST -> Complete seconds per video, and how busy the GPU stays.

    python -m bench.served_e2e [--compile] [--attention-backend NAME] [--queue 8] [--nvml-index 0]
    python -m bench.served_e2e --tiny    # CPU smoke check: tiny model, fake GPU

The full-size Wan2.1-T2V-1.3B architecture with random weights (bench/common.py) at 832x480, 81 frames, on
the T2V deployment (one replica, one GPU, SQLite, local files), driven over HTTP as a client would. In order:

1. warm: one 2-step task (model resident; with ``--compile`` this call compiles, so its time is reported);
2. ``exact``: one ``--long-steps`` task, CFG 5.0;
3. ``distilled``: one ``--distilled-steps`` task, guidance 1 (a distilled LoRA's schedule; the LoRA itself
   is not loaded: fused, it costs nothing per step);
4. ``cached``: one ``--long-steps`` task with ``skip_steps_cache_type: mag`` (ratios calibrated first in
   this process, ``--calib-steps`` steps, on the same GPU, unless ``$HWGP_CACHE_DIR`` already holds them);
5. ``never idle``: ``--queue`` tasks of ``--steps`` steps posted at once; the wall time until the last is
   Complete, the GPU's busy share over that window (NVML utilisation sampled every 100 ms: the share of
   time a kernel ran) and the replica's own busy share (its ``recent`` spans from ``/replicas``).

Each row: POST -> Complete seconds and the task's own timings (queue wait, load, text encode, denoise,
decode, encode, save). Weights are random: speed only. Goals (issue 21): exact 50 steps <= 45 s, cached
<= 22 s, distilled <= 6 s, GPU busy >= 95% with 8 queued.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import PROMPT, model_label, models_root, post, prepare_models

GOALS = {"exact": 45.0, "cached": 22.0, "distilled": 6.0}


class GpuSampler:
    """NVML utilisation of one physical GPU, sampled every ``period`` seconds in a thread."""

    def __init__(self, index: int | None, period: float = 0.1):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._handle = None
        if index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._nvml = pynvml
            except Exception as error:  # no NVML here (CPU smoke check): report None
                print(f"NVML unavailable: {type(error).__name__}: {error}", flush=True)
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while self._handle is not None and not self._stop.wait(period):
            rate = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self.samples.append((time.time(), rate))

    def busy(self, start: float, end: float) -> float | None:
        """Mean utilisation (0..1) between two epoch times."""
        window = [rate for at, rate in self.samples if start <= at <= end]
        return statistics.fmean(window) / 100 if window else None

    def stop(self) -> None:
        self._stop.set()


def _task_row(name: str, client, params: dict) -> dict:
    start = time.perf_counter()
    task_id = post(client, "t2v", params)
    task = _wait(client, task_id)
    seconds = time.perf_counter() - start
    result = task.get("result") or {}
    row = {"run": name, "steps": params["num_inference_steps"], "post_to_complete_s": seconds,
           "timings": result.get("timings"), "acceleration": result.get("acceleration")}  # fmt: skip
    timings = " ".join(f"{k}={v:.2f}" for k, v in (row["timings"] or {}).items())
    print(f"{name}: {row['steps']} steps, POST->Complete {seconds:.2f}s [{timings}]", flush=True)
    return row


def _wait(client, task_id: str) -> dict:
    from hwgp_testing import wait_complete

    return wait_complete(client, task_id, timeout_s=600, poll_s=0.02)


def _replica_busy(client, start: float, end: float) -> float | None:
    """The share of [start, end] (epoch s) the replica spent generating, from its recent spans."""
    stats = client.get("/replicas").json().get("T2V") or {}
    spans = [
        (max(r["started"], start), min(r["finished"], end))
        for replica in stats.get("replicas", [stats])
        for r in replica.get("recent", [])
    ]
    busy = sum(max(0.0, b - a) for a, b in spans)
    return busy / (end - start) if spans else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="the deployment's compile: true")
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--steps", type=int, default=10, help="steps of the queued tasks")
    parser.add_argument("--long-steps", type=int, default=50)
    parser.add_argument("--distilled-steps", type=int, default=4)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--multiplier", type=float, default=3.0)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--nvml-index", type=int, default=0, help="the physical GPU to sample")
    parser.add_argument("--skip", default="", help="comma-separated: exact, distilled, cached")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny model, fake GPU")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    width, height, frames = (64, 48, 9) if args.tiny else (832, 480, 81)
    if args.tiny:
        args.steps, args.long_steps, args.calib_steps, args.distilled_steps = 2, 4, 4, 2
    tmp = Path(tempfile.mkdtemp(prefix="hwgp-served-e2e-"))
    os.environ.setdefault("HWGP_CACHE_DIR", str(tmp / "cache"))  # ratios and inductor cache, this run's own
    models_dir, ids = prepare_models(models_root(tmp), args.tiny)
    model_id = ids["t2v"]
    base = {"model": model_id, "prompt": PROMPT, "resolution": f"{width}x{height}", "video_length": frames,
            "guidance_scale": 5.0, "seed": 0}  # fmt: skip
    results: dict = {"rows": [], "args": vars(args) | {"json": str(args.json)}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))

    skip = set(filter(None, args.skip.split(",")))
    from Wan2GP.acceleration import load_mag_ratios

    if "cached" not in skip and load_mag_ratios(model_id) is not None:
        print(f"MagCache ratios of {model_id} found under $HWGP_CACHE_DIR: not calibrated again", flush=True)
    elif "cached" not in skip:  # calibrate before the replica takes the GPU (same process, freed after)
        from Wan2GP.acceleration import calibrate_mag_ratios
        from Wan2GP.catalog import Catalog
        from Wan2GP.engine import Engine

        start = time.perf_counter()
        engine = Engine(device="cpu" if args.tiny else "cuda", catalog=Catalog.load(models_dir), lora_dirs=[])
        calibrate_mag_ratios(engine, "t2v", {**base, "num_inference_steps": args.calib_steps})
        engine.unload()
        del engine
        results["calibration_s"] = time.perf_counter() - start
        if not args.tiny:
            import torch

            torch.cuda.empty_cache()
        print(f"MagCache calibration ({args.calib_steps} steps): {results['calibration_s']:.1f}s", flush=True)

    from hwgp_testing import running_app

    family = {"num_gpus": 1, "num_cpus": 1, "preload": True, "default_models": {"t2v": model_id},
              "compile": args.compile, "attention_backend": args.attention_backend}  # fmt: skip
    if args.tiny:
        family.update(device="cpu", num_cpus=0.1, compile=False)
    config = {
        "db": f"sqlite:///{tmp}/tasks.db",
        "storage": {"root": str(tmp / "files")},
        "models": "tiny" if args.tiny else "real",
        "models_dir": models_dir,
        "deployments": {"T2V": family},
        "ingress": {"poll_interval_s": 0.05, "progress_interval_s": 1.0},
    }
    sampler = GpuSampler(None if args.tiny else args.nvml_index)
    with running_app(config, num_gpus=1, num_cpus=max(os.cpu_count() or 2, 4)) as client:
        client.timeout = 120
        warm = _task_row("warm (first task: load" + (", compile)" if args.compile else ")"), client,
                         {**base, "num_inference_steps": 2})  # fmt: skip
        results["rows"].append(warm)
        save()
        if "exact" not in skip:
            row = _task_row("exact", client, {**base, "num_inference_steps": args.long_steps})
            results["rows"].append(row)
            save()
        if "distilled" not in skip:
            params = {**base, "num_inference_steps": args.distilled_steps, "guidance_scale": 1.0}
            _task_row("distilled (warm)", client, params)
            results["rows"].append(_task_row("distilled", client, {**params, "seed": 1}))
            save()
        if "cached" not in skip:
            params = {**base, "num_inference_steps": args.long_steps, "skip_steps_cache_type": "mag",
                      "skip_steps_multiplier": args.multiplier, "skip_steps_start_step_perc": 20}  # fmt: skip
            row = _task_row("cached (MagCache)", client, params)
            results["rows"].append(row)
            save()

        params = {**base, "num_inference_steps": args.steps}
        start_epoch, start = time.time(), time.perf_counter()
        task_ids = [post(client, "t2v", {**params, "seed": 100 + i}) for i in range(args.queue)]
        tasks = [_wait(client, task_id) for task_id in task_ids]
        wall = time.perf_counter() - start
        end_epoch = time.time()
        per_task = [t.get("result", {}).get("timings", {}) for t in tasks]
        results["queue"] = {
            "tasks": args.queue,
            "steps": args.steps,
            "wall_s": wall,
            "s_per_task": wall / args.queue,
            "gpu_busy": sampler.busy(start_epoch, end_epoch),
            "replica_busy": _replica_busy(client, start_epoch, end_epoch),
            "timings_mean": {
                k: statistics.fmean(t.get(k, 0.0) for t in per_task)
                for k in sorted({k for t in per_task for k in t})
            },
        }
    sampler.stop()
    q = results["queue"]
    busy = "n/a" if q["gpu_busy"] is None else f"{q['gpu_busy']:.1%}"
    replica = "n/a" if q["replica_busy"] is None else f"{q['replica_busy']:.1%}"
    print(f"queue: {q['tasks']} tasks x {q['steps']} steps in {q['wall_s']:.1f}s ({q['s_per_task']:.2f} s/task); "
          f"GPU busy {busy} (NVML), replica busy {replica}; mean timings {q['timings_mean']}", flush=True)  # fmt: skip
    save()

    print(f"# served, one GPU: {model_label(args.tiny)}, {width}x{height}, {frames} frames, CFG 5.0 unless noted, "
          f"compile={args.compile}, attention_backend={args.attention_backend or 'native'}")  # fmt: skip
    print("| run | steps | POST->Complete s | goal | denoise s | decode s | encode s |")
    print("|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        t = row["timings"] or {}
        goal = GOALS.get(row["run"].split(" ")[0])
        print(f"| {row['run']} | {row['steps']} | {row['post_to_complete_s']:.2f} | "
              f"{'' if goal is None else f'<= {goal:g}'} | {t.get('denoise', 0):.2f} | {t.get('decode', 0):.2f} | "
              f"{t.get('encode', 0):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
