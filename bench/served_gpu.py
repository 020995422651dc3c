"""One GPU, one video: bare diffusers eager vs the engine exact, compiled, step-cached and distilled, same run.

    python -m bench.served_gpu [--steps 10] [--long-steps 50] [--calib-steps 20] [--multiplier 3.0]
    python -m bench.served_gpu --tiny     # CPU smoke check: tiny model, few steps

The full-size Wan2.1-T2V-1.3B architecture with random weights (bench/common.py), 832x480, 81 frames, CFG 5.0.
Rows, in this order (each printed as soon as it is measured):

1. ``bare``: a bare diffusers ``WanPipeline`` call (eager), the baseline;
2. ``engine``: the engine, eager (``Wan2GP.engine.Engine``);
3. attention backends: one transformer forward per diffusers backend available here, vs ``native``;
4. ``compiled``: the engine with ``AccelerationConfig(compile=True)`` and the fastest exact backend
   (first call = compile; then a fresh engine in the same process = warm start from the disk cache);
5. ``distilled``: the compiled engine on a distilled preset's schedule (4 steps, guidance 1; the LoRA
   itself is not loaded: fused, it costs nothing per step);
6. ``cached``: MagCache (``skip_steps_cache_type: mag``) at ``--long-steps`` after a ``--calib-steps``
   calibration, vs the exact engine at ``--long-steps`` (compiled, then eager).

Each row: s/video (the engine's call, MP4 encode included; bare: the pipeline call, no encode), s/step of the
denoising loop, peak GiB, and the relative error of the final latents (what the VAE decodes) vs the eager
engine with the same steps and seed. Weights are random: quality cannot be judged here, only closeness.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    PROMPT,
    cuda_sync,
    model_label,
    models_root,
    peak_gib,
    peak_reset,
    prepare_models,
    relative_error,
)

RESULTS: dict = {"rows": [], "attention": []}


def _row(name: str, steps: int, seconds: float, per_step: float | None, latents, reference, **extra) -> dict:
    row = {"run": name, "steps": steps, "s_per_video": seconds, "s_per_step": per_step, "peak_gib": peak_gib(),
           "rel_error": None if reference is None else relative_error(latents, reference), **extra}  # fmt: skip
    RESULTS["rows"].append(row)
    error = (
        "" if row["rel_error"] is None else f", latents rel. error {row['rel_error']:.2e} ({extra.get('vs')})"
    )
    step = "" if per_step is None else f", {per_step:.3f} s/step"
    print(f"{name}: {steps} steps, {seconds:.2f} s/video{step}{error} {extra.get('note', '')}", flush=True)
    return row


class _StepClock:
    """The engine's progress callback: the time at the end of each step (synchronised)."""

    def __init__(self):
        self.marks: list[float] = []

    def __call__(self, step: int, total: int) -> None:
        cuda_sync()
        self.marks.append(time.perf_counter())

    def per_step(self) -> float | None:
        return (self.marks[-1] - self.marks[0]) / (len(self.marks) - 1) if len(self.marks) > 1 else None


def _params(model_id: str, args, steps: int, **extra) -> dict:
    return {"model": model_id, "prompt": PROMPT, "resolution": f"{args.width}x{args.height}",
            "video_length": args.frames, "num_inference_steps": steps, "guidance_scale": 5.0, "seed": 0,
            **extra}  # fmt: skip


def _timed(engine, params: dict) -> tuple[float, _StepClock, object]:
    clock = _StepClock()
    cuda_sync()
    start = time.perf_counter()
    artifact = engine.generate("t2v", params, progress=clock)
    cuda_sync()
    return time.perf_counter() - start, clock, artifact


def _latents_of(engine) -> np.ndarray:
    return engine.pipe.vae._hwgp_decode_recorder.last_latents.numpy()


def _engine(catalog, device: str, acceleration=None):
    from Wan2GP.engine import Engine

    return Engine(device=device, catalog=catalog, lora_dirs=[], acceleration=acceleration)


def _loaded(engine, model_id: str):
    from Wan2GP.parallel import wrap_vae_decode

    engine.load(model_id)
    wrap_vae_decode(engine.pipe.vae)  # records the final latents
    return engine


def bare(folder: str, args, device: str) -> np.ndarray:
    """A bare WanPipeline call: the baseline; returns its final latents."""
    from diffusers import WanPipeline

    from Wan2GP.parallel import wrap_vae_decode

    peak_reset()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    pipe = WanPipeline.from_pretrained(folder, dtype={"default": dtype, "vae": torch.float32}).to(device)
    pipe.set_progress_bar_config(disable=True)
    recorder = wrap_vae_decode(pipe.vae)
    marks: list[float] = []

    def call(steps: int) -> float:
        marks.clear()

        def on_step(p, i, t, kwargs):
            cuda_sync()
            marks.append(time.perf_counter())
            return {}

        cuda_sync()
        start = time.perf_counter()
        pipe(prompt=PROMPT, negative_prompt="", height=args.height, width=args.width, num_frames=args.frames,
             num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0),
             output_type="np", callback_on_step_end=on_step)  # fmt: skip
        cuda_sync()
        return time.perf_counter() - start

    call(2)  # warm
    seconds = call(args.steps)
    latents = recorder.last_latents.numpy()
    _row(
        "bare WanPipeline (eager)",
        args.steps,
        seconds,
        (marks[-1] - marks[0]) / (len(marks) - 1),
        latents,
        None,
    )
    return latents


def attention_backends(engine, args, device: str) -> str:
    """Time one transformer forward per attention backend; the fastest whose output matches ``native``."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    transformer = engine.pipe.transformer
    dtype = transformer.proj_out.weight.dtype  # (some parameters are kept in float32)
    frames = (args.frames - 1) // 4 + 1
    generator = torch.Generator("cpu").manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, frames, args.height // 8, args.width // 8, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, transformer.config.text_dim, generator=generator),
    }
    inputs = {
        k: v.to(device, dtype if v.is_floating_point() and k != "timestep" else v.dtype)
        for k, v in inputs.items()
    }
    from Wan2GP.acceleration import CPU_ATTENTION_CANDIDATES, EXACT_ATTENTION_ERROR, GPU_ATTENTION_CANDIDATES

    candidates = CPU_ATTENTION_CANDIDATES if args.tiny else (*GPU_ATTENTION_CANDIDATES, "sage")
    known = {b.value for b in AttentionBackendName}
    reference, best, best_s = None, "native", float("inf")
    for name in [c for c in candidates if c in known]:
        try:
            transformer.set_attention_backend(name)
            with torch.no_grad():
                for _ in range(2):
                    out = transformer(**inputs, return_dict=False)[0]
                cuda_sync()
                start = time.perf_counter()
                for _ in range(args.forward_repeats):
                    out = transformer(**inputs, return_dict=False)[0]
                cuda_sync()
            seconds = (time.perf_counter() - start) / args.forward_repeats
        except Exception as error:  # not installed / not supported on this GPU: recorded, not fatal
            RESULTS["attention"].append(
                {"backend": name, "error": f"{type(error).__name__}: {str(error)[:160]}"}
            )
            print(f"attention {name}: unavailable ({type(error).__name__}: {str(error)[:160]})", flush=True)
            continue
        out = out.float().cpu().numpy()
        if reference is None:
            reference = out
        error = relative_error(out, reference)
        exact = error < EXACT_ATTENTION_ERROR
        RESULTS["attention"].append({"backend": name, "forward_s": seconds, "rel_error_vs_native": error,
                                     "exact": exact})  # fmt: skip
        print(
            f"attention {name}: {seconds * 1000:.1f} ms/forward, rel. error vs native {error:.2e}", flush=True
        )
        if exact and seconds < best_s:
            best, best_s = name, seconds
    transformer.set_attention_backend("native")
    print(f"fastest exact attention backend: {best}", flush=True)
    RESULTS["best_attention"] = best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--long-steps", type=int, default=50, help="the step-caching schedule")
    parser.add_argument("--calib-steps", type=int, default=20, help="MagCache calibration run")
    parser.add_argument(
        "--multiplier", type=float, default=3.0, help="skip_steps_multiplier of the cached run"
    )
    parser.add_argument("--start-perc", type=float, default=20.0, help="skip_steps_start_step_perc")
    parser.add_argument("--distilled-steps", type=int, default=4)
    parser.add_argument("--forward-repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: eager-long")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tiny:
        args.width, args.height, args.frames = 64, 48, 9
        args.steps, args.long_steps, args.calib_steps, args.forward_repeats = 3, 6, 6, 1
    device = "cpu" if args.tiny else "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="hwgp-served-"))
    os.environ.setdefault("HWGP_CACHE_DIR", str(tmp / "cache"))
    from Wan2GP.acceleration import AccelerationConfig, calibrate_mag_ratios
    from Wan2GP.catalog import Catalog

    models_dir, ids = prepare_models(models_root(tmp), args.tiny)
    model_id = ids["t2v"]
    catalog = Catalog.load(models_dir)
    folder = str(catalog.resolve_source(catalog.get(model_id).source))
    RESULTS["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    RESULTS["args"] = vars(args) | {"json": str(args.json)}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(RESULTS, indent=2, default=str))

    bare_latents = bare(folder, args, device)
    bare_s = RESULTS["rows"][0]["s_per_video"]

    # 2. the engine, eager
    peak_reset()
    eager = _loaded(_engine(catalog, device), model_id)
    _timed(eager, _params(model_id, args, 2))  # warm
    seconds, clock, artifact = _timed(eager, _params(model_id, args, args.steps))
    exact = _latents_of(eager)
    _row("engine (eager)", args.steps, seconds, clock.per_step(), exact, bare_latents, vs="bare",
         timings=artifact.metadata["timings"])  # fmt: skip
    save()

    # 3. attention backends
    backend = attention_backends(eager, args, device)
    save()

    # 4. compiled (first call compiles), then a fresh engine: warm start from the disk cache
    peak_reset()
    acceleration = AccelerationConfig(compile=True, attention_backend=backend)
    compiled = _loaded(_engine(catalog, device, acceleration), model_id)
    first_s, _, _ = _timed(compiled, _params(model_id, args, 2))
    seconds, clock, artifact = _timed(compiled, _params(model_id, args, args.steps))
    _row("engine compiled", args.steps, seconds, clock.per_step(), _latents_of(compiled), exact, vs="engine eager",
         first_call_s=first_s, note=f"(first call, compiling: {first_s:.1f}s)",
         acceleration=artifact.metadata["acceleration"], timings=artifact.metadata["timings"])  # fmt: skip
    save()
    restarted = _loaded(_engine(catalog, device, acceleration), model_id)
    warm_first_s, _, _ = _timed(restarted, _params(model_id, args, 2))
    warm_second_s, _, _ = _timed(restarted, _params(model_id, args, 2))
    RESULTS["warm_start"] = {
        "first_call_s": warm_first_s,
        "second_call_s": warm_second_s,
        "cold_first_call_s": first_s,
    }
    print(f"warm start (fresh engine, inductor cache on disk): first 2-step call {warm_first_s:.1f}s, "
          f"second {warm_second_s:.1f}s (cold first call {first_s:.1f}s)", flush=True)  # fmt: skip
    del restarted
    save()

    # 5. distilled schedule: 4 steps, guidance 1 (one forward per step)
    distilled = _params(model_id, args, args.distilled_steps, guidance_scale=1.0)
    _timed(compiled, distilled)  # warm (no CFG: the uncond pass is gone)
    seconds, clock, artifact = _timed(compiled, distilled)
    _row("engine compiled, distilled schedule (4 steps, guidance 1)", args.distilled_steps, seconds,
         clock.per_step(), _latents_of(compiled), None, timings=artifact.metadata["timings"])  # fmt: skip
    save()

    # 6. step caching at the long schedule vs exact
    seconds, clock, artifact = _timed(compiled, _params(model_id, args, args.long_steps))
    long_compiled = _latents_of(compiled)
    _row("engine compiled", args.long_steps, seconds, clock.per_step(), long_compiled, None,
         timings=artifact.metadata["timings"])  # fmt: skip
    save()
    start = time.perf_counter()
    calibrate_mag_ratios(eager, "t2v", _params(model_id, args, args.calib_steps))
    RESULTS["calibration_s"] = time.perf_counter() - start
    cached_params = _params(model_id, args, args.long_steps, skip_steps_cache_type="mag",
                            skip_steps_multiplier=args.multiplier, skip_steps_start_step_perc=args.start_perc)  # fmt: skip
    _timed(eager, {**cached_params, "num_inference_steps": 2})
    seconds, clock, artifact = _timed(eager, cached_params)
    cached = _latents_of(eager)
    report = artifact.metadata["acceleration"]["step_cache"]
    _row(f"engine MagCache x{args.multiplier} (eager blocks)", args.long_steps, seconds, None, cached, long_compiled,
         vs="compiled exact", step_cache=report, timings=artifact.metadata["timings"],
         note=f"(skipped {report['skipped_fraction']:.0%} of {report['forwards']} forwards; "
              f"calibration {RESULTS['calibration_s']:.1f}s)")  # fmt: skip
    save()
    if "eager-long" not in args.skip:
        seconds, clock, artifact = _timed(eager, _params(model_id, args, args.long_steps))
        long_eager = _latents_of(eager)
        _row("engine (eager)", args.long_steps, seconds, clock.per_step(), long_eager, None,
             timings=artifact.metadata["timings"])  # fmt: skip
        RESULTS["cached_vs_eager_rel_error"] = relative_error(cached, long_eager)
        RESULTS["compiled_vs_eager_long_rel_error"] = relative_error(long_compiled, long_eager)
        print(f"at {args.long_steps} steps vs eager: MagCache rel. error {RESULTS['cached_vs_eager_rel_error']:.2e}, "
              f"compiled {RESULTS['compiled_vs_eager_long_rel_error']:.2e}", flush=True)  # fmt: skip
    save()

    print(f"# one GPU ({RESULTS['device']}): {model_label(args.tiny)}, {args.width}x{args.height}, "
          f"{args.frames} frames, CFG 5.0 unless noted; attention backend of the compiled runs: {backend}")  # fmt: skip
    bare_step = RESULTS["rows"][0]["s_per_step"]
    print("| run | steps | s/video | s/step | s/step vs bare | peak GiB | latents rel. err | vs |")
    print("|---|---|---|---|---|---|---|---|")
    for row in RESULTS["rows"]:
        per_step = "" if row["s_per_step"] is None else f"{row['s_per_step']:.3f}"
        speed = "" if row["s_per_step"] is None else f"{bare_step / row['s_per_step']:.2f}x"
        error = "" if row["rel_error"] is None else f"{row['rel_error']:.2e}"
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        print(f"| {row['run']} | {row['steps']} | {row['s_per_video']:.2f} | {per_step} | {speed} | {peak} "
              f"| {error} | {row.get('vs', '')} |")  # fmt: skip
    print(
        f"bare eager extrapolated to {args.long_steps} steps: "
        f"{bare_s + (args.long_steps - args.steps) * bare_step:.1f}s (s/step x extra steps, labelled as such)"
    )


if __name__ == "__main__":
    main()
