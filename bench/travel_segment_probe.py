"""Where a chained travel segment's time goes on one GPU: the work between two segments, phase by phase.

    python -m bench.travel_segment_probe [--segments 3] [--steps 6] [--frames 33] [--resolution 832x480]
    python -m bench.travel_segment_probe --tiny    # CPU smoke check: tiny VACE

The full-size Wan2.1-VACE-1.3B architecture with random weights (bench/common.py) in an :class:`Engine` in this
process, no Ray: the travel code's own functions plan the run (``dag.travel_plan``), build each segment's
guide and mask from the previous clip, and the engine renders it, as ``dag.travel.segment_node`` does. Each
phase is timed with a device sync on both sides (which serialises it, as the chain does anyway):

- ``guide``: the segment's guide and mask from the previous clip and the anchors (CPU);
- ``vae encode``: the VACE conditioning (the pipeline encodes the masked guide twice, and the references);
- ``transformer``: every forward of the denoising loop (2 per step with CFG);
- ``vae decode`` and ``to uint8``: the engine's decode phase;
- ``other``: the rest of the render (params, text encoding cache, scheduler, transfers);
- ``mp4 encode`` / ``mp4 decode``: the segment's file, and the frames read back from it. The served chain did
  both between two segments until the segment node handed its frames on directly (``dag.travel``): the
  file is now made aside while the next segment generates.

Segment 0 warms up; the later ones are timed and averaged.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import cuda_sync, model_label, models_root, prepare_models
from bench.parallel_travel import add_travel_size_arguments, fill_travel_size
from bench.parallel_travel import anchors as anchor_images

PHASES = ("guide", "vae encode", "transformer", "vae decode", "other", "mp4 encode", "mp4 decode")


class PhaseClock:
    """Seconds per phase, summed; `wrap` times a callable, `hooks` time a module's forwards."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._started: dict[str, float] = {}

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(phase)

        return timed

    def hooks(self, phase: str, module) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(phase))
        module.register_forward_hook(lambda *_: self.stop(phase))

    def start(self, phase: str) -> None:
        cuda_sync()
        self._started[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        cuda_sync()
        self.seconds[phase] += time.perf_counter() - self._started.pop(phase)
        self.calls[phase] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=3, help="segment 0 warms up; the rest are timed")
    add_travel_size_arguments(parser)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny VACE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    fill_travel_size(args)
    if args.segments < 2:
        parser.error("--segments: must be at least 2 (segment 0 only warms up)")

    import torch

    from dag.travel_plan import parse_travel, plan_segments, segment_guide, segment_params
    from Wan2GP.catalog import Catalog
    from Wan2GP.engine import Engine
    from Wan2GP.video import decode_video, encode_mp4, load_image

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="hwgp-segprobe-"))
    width, height = (int(v) for v in args.resolution.split("x"))
    models_dir, ids = prepare_models(models_root(tmp), args.tiny, families=("vace",))
    paths = anchor_images(tmp, args.segments + 1, width, height)
    plan = parse_travel(
        {"images": paths, "prompt": "travel between the images", "frames": args.frames, "overlap": args.overlap,
         "resolution": args.resolution, "num_inference_steps": args.steps, "seed": 1, "model": ids["vace"],
         "chain_segments": True},
        default_run_id="probe",
    )  # fmt: skip
    specs = plan_segments(plan)
    anchors = [load_image(Path(p)) for p in paths]

    engine = Engine(device=device, catalog=Catalog.load(models_dir), lora_dirs=[])
    engine.load(ids["vace"])
    pipe = engine.pipe
    clock = PhaseClock()
    pipe.vae.encode = clock.wrap("vae encode", pipe.vae.encode)
    clock.hooks("transformer", pipe.transformer)

    per_segment: list[dict[str, float]] = []
    previous = None
    for spec in specs:
        clock.reset()
        clock.start("guide")
        guide, mask = segment_guide(plan, spec, previous, anchors)
        params = segment_params(plan, spec, guide, mask)
        clock.stop("guide")
        start = time.perf_counter()
        rendered = engine.render("vace", params, task_id=f"segment{spec.index}")
        cuda_sync()
        render_s = time.perf_counter() - start
        timings = rendered.metadata.get("timings", {})
        data = clock.wrap("mp4 encode", encode_mp4)(rendered.frames, fps=plan.fps)
        previous = clock.wrap("mp4 decode", decode_video)(data)[0]
        phases = dict(clock.seconds)
        phases["vae decode"] = float(timings.get("decode", 0.0))
        phases["other"] = render_s - sum(
            phases.get(p, 0.0) for p in ("vae encode", "transformer", "vae decode")
        )
        phases["total"] = sum(phases[p] for p in PHASES if p in phases)
        counts = {"vae encode": clock.calls["vae encode"], "transformer": clock.calls["transformer"]}
        print(f"segment {spec.index}: {phases['total']:.2f}s "
              + ", ".join(f"{p} {phases.get(p, 0.0):.2f}" for p in PHASES) + f"; calls {counts}", flush=True)  # fmt: skip
        if spec.index > 0:
            per_segment.append(phases)

    mean = {p: sum(s.get(p, 0.0) for s in per_segment) / len(per_segment) for p in (*PHASES, "total")}
    print(f"# one chained travel segment on 1 {device.upper()}: {model_label(args.tiny, 'vace')}, {args.frames} frames "
          f"at {args.resolution}, {args.steps} steps, CFG 5.0 (mean of {len(per_segment)} segments after a warm-up)")  # fmt: skip
    print("| phase | s | share |")
    print("|---|---:|---:|")
    for phase in PHASES:
        print(f"| {phase} | {mean[phase]:.2f} | {mean[phase] / mean['total']:.0%} |")
    print(f"| total | {mean['total']:.2f} | |")
    if args.json:
        args.json.write_text(json.dumps({"mean": mean, "segments": per_segment}, indent=2))


if __name__ == "__main__":
    main()
