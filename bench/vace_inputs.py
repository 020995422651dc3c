"""Cost of handing a VACE guide and mask to the pipeline: diffusers' path from PIL frames vs `video_tensor`.

    python -m bench.vace_inputs [--frames 33] [--width 832] [--height 480] [--repeats 5] [--device cpu]

Both ways end in `WanVACEPipeline.preprocess_conditions` (the tiny VACE pipeline: the conversion does not depend
on the model's size), which returns the guide and mask tensors on `--device`, as a generation needs them:

- ``pil``: what run_vace did before: the uint8 frames as PIL images, each converted to float on the CPU by
  diffusers' video processor, then moved to the device;
- ``tensor``: `Wan2GP.pipelines.video_tensor`: the uint8 frames copied to the device once and converted there.

With ``--device cpu`` both ways run the same tensor operations (resize, normalise, clamp) on the CPU, so expect
equal times there (1.24 vs 1.23 s on the 2-core CI machine); the difference is on a GPU, where ``tensor`` runs
them on the device instead of the host. Prints the median seconds of each and checks that both give the same
tensors (the largest difference of each). Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

from Wan2GP.catalog import Catalog
from Wan2GP.engine import Engine
from Wan2GP.pipelines import video_tensor
from Wan2GP.tiny import ensure_tiny_models


def _synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    tiny = ensure_tiny_models()
    engine = Engine(device="cpu", catalog=Catalog.load(tiny_dir=tiny.parent), lora_dirs=[])
    engine.load("tiny-vace")
    pipe = engine.pipe
    rng = np.random.default_rng(0)
    guide = rng.integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    mask = np.zeros_like(guide)
    mask[args.frames // 4 :] = 255
    size = {"height": args.height, "width": args.width, "num_frames": args.frames, "dtype": torch.float32}
    size["device"] = device

    def from_pil():
        video = [Image.fromarray(frame) for frame in guide]
        masks = [Image.fromarray(frame) for frame in mask]
        return pipe.preprocess_conditions(video=video, mask=masks, **size)[:2]

    def from_tensor():
        return pipe.preprocess_conditions(
            video=video_tensor(guide, device), mask=video_tensor(mask, device), **size
        )[:2]

    seconds: dict[str, list[float]] = {"pil": [], "tensor": []}
    results = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, run in (("pil", from_pil), ("tensor", from_tensor)):
            _synced(device)
            started = time.perf_counter()
            results[name] = run()
            _synced(device)
            seconds[name].append(time.perf_counter() - started)
    differences = [
        float((a.float() - b.float()).abs().max())
        for a, b in zip(results["pil"], results["tensor"], strict=True)
    ]
    pil, tensor = (statistics.median(seconds[n][1:]) for n in ("pil", "tensor"))
    print(
        f"# VACE guide + mask, {args.frames} frames at {args.width}x{args.height} -> {device}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print("| path | median s |")
    print("|---|---:|")
    print(f"| PIL frames (diffusers' video processor) | {pil:.3f} |")
    print(f"| video_tensor | {tensor:.3f} |")
    print(
        f"speed-up {pil / tensor:.1f}x; max abs difference: guide {differences[0]:.3g}, mask {differences[1]:.3g}"
    )


if __name__ == "__main__":
    main()
