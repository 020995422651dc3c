"""The engine on a GPU with the full-size Wan2.1 T2V 1.3B architecture (random weights), against a bare
diffusers WanPipeline call on the same weights in the same run.

    python -m bench.engine_gpu [--steps 8] [--width 832 --height 480 --frames 81] [--profiles resident,...]

The model is bench/common.py's random-weight build. Reports s/step of the denoising loop (classifier-free
guidance on: two transformer passes per step), the achieved TFLOP/s of the transformer (analytic count), and the engine / bare ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PROMPT, build_t2v, transformer_flops


def _bare(folder: Path, args, prompt: str) -> dict:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(
        str(folder), dtype={"default": torch.bfloat16, "vae": torch.float32}, local_files_only=True
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []

    def on_step(p, i, t, kwargs):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return {}

    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(
        prompt=prompt,
        negative_prompt="",
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        callback_on_step_end=on_step,
    )
    torch.cuda.synchronize()
    end = time.perf_counter()
    # Steady-state s/step: from the end of the first step to the end of the last one.
    per_step = (marks[-1] - marks[0]) / (len(marks) - 1)
    del pipe
    torch.cuda.empty_cache()
    return {"total_s": end - start, "s_per_step": per_step, "decode_s": end - marks[-1]}


def _engine(folder: Path, args, prompt: str, profile: str, steps: int) -> dict:
    from Wan2GP.catalog import Catalog, ModelDefinition
    from Wan2GP.engine import Engine

    catalog = Catalog.load()
    catalog.add(
        ModelDefinition(
            id="bench-wan2.1-1.3b",
            family="t2v",
            pipeline="WanPipeline",
            source=str(folder),
            dtype="bfloat16",
            component_dtypes={"vae": "float32"},
        )
    )
    gc.collect()  # free the previous run's pipeline so the peak below is this profile's own
    torch.cuda.empty_cache()
    engine = Engine(device="cuda", memory_profile=profile, catalog=catalog, lora_dirs=[])
    marks: list[float] = []

    def progress(step: int, total: int) -> None:
        torch.cuda.synchronize()
        marks.append(time.perf_counter())

    params = {
        "model": "bench-wan2.1-1.3b",
        "prompt": prompt,
        "resolution": f"{args.width}x{args.height}",
        "video_length": args.frames,
        "num_inference_steps": steps,
        "guidance_scale": 5.0,
        "seed": 0,
    }
    torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(2):  # cold (load + first call), then warm
        marks.clear()
        start = time.perf_counter()
        artifact = engine.generate("t2v", params, progress=progress)
        runs.append((time.perf_counter() - start, list(marks), artifact.metadata))
    total, warm_marks, meta = runs[1]
    return {
        "profile": profile,
        "load_s": runs[0][2]["timings"]["load"],
        "cold_total_s": runs[0][0],
        "total_s": total,
        "s_per_step": (warm_marks[-1] - warm_marks[0]) / (len(warm_marks) - 1),
        "timings": meta["timings"],
        "frames": meta["frames"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "load_count": engine.load_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--profiles", default="resident", help="comma-separated memory profiles to time")
    parser.add_argument("--offload-steps", type=int, default=3, help="steps for the offload profiles")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompt = PROMPT

    flops_step = 2 * transformer_flops(args.width, args.height, args.frames)  # CFG: two passes per step
    results: dict = {"device": torch.cuda.get_device_name(), "flops_per_step": flops_step, "engine": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "wan2.1-1.3b-random"
        start = time.perf_counter()
        build_t2v(folder)
        results["build_s"] = time.perf_counter() - start
        results["engine"].append(_engine(folder, args, prompt, "resident", args.steps))
        results["bare"] = _bare(folder, args, prompt)
        for profile in [p for p in args.profiles.split(",") if p and p != "resident"]:
            try:
                results["engine"].append(_engine(folder, args, prompt, profile, args.offload_steps))
            except Exception as error:  # report and go on: one profile failing must not hide the others
                results["engine"].append({"profile": profile, "error": f"{type(error).__name__}: {error}"})

    bare = results["bare"]
    print(f"{results['device']}: Wan2.1 1.3B architecture, random weights, {args.width}x{args.height}, "
          f"{args.frames} frames, CFG on, build {results['build_s']:.1f}s")  # fmt: skip
    print("| run | steps | s/step | TFLOP/s | total s | load s | encode_prompt s | denoise s | decode s | "
          "encode_file s | peak GiB | vs bare s/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| bare WanPipeline | {args.steps} | {bare['s_per_step']:.3f} | {flops_step / bare['s_per_step'] / 1e12:.0f}"
          f" | {bare['total_s']:.1f} | | | | {bare['decode_s']:.1f} | | | 1.00 |")  # fmt: skip
    for run in results["engine"]:
        if "error" in run:
            print(f"| engine {run['profile']} | error: {run['error'][:200]} |")
            continue
        t = run["timings"]
        steps = args.steps if run["profile"] == "resident" else args.offload_steps
        print(
            f"| engine {run['profile']} | {steps} | {run['s_per_step']:.3f} | "
            f"{flops_step / run['s_per_step'] / 1e12:.0f} | {run['total_s']:.1f} | {run['load_s']:.1f} | "
            f"{t['encode_prompt']:.2f} | {t['denoise']:.1f} | {t['decode']:.1f} | {t['encode_file']:.1f} | "
            f"{run['peak_gib']:.1f} | {run['s_per_step'] / bare['s_per_step']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
