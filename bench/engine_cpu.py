"""Per-family latency of the engine on tiny models, on CPU: load / encode prompt / denoise / decode / encode file.

    python -m bench.engine_cpu [--repeats 3] [--frames 9] [--size 32x32] [--steps 2] [--threads 1]

Each family gets a fresh engine: the first task pays the load (cold), the following ones reuse the model;
the table shows the cold load and the median of the warm tasks' phases, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _tasks(frames: int, size: str, steps: int) -> list[tuple[str, str, dict]]:
    rng = np.random.default_rng(0)
    width, height = (int(v) for v in size.split("x"))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    guide = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    common = {
        "prompt": "a cat walking in the city",
        "seed": 1,
        "resolution": size,
        "num_inference_steps": steps,
    }
    video = {**common, "video_length": frames}
    return [
        ("t2v", "tiny-t2v", video),
        ("i2v", "tiny-i2v", {**video, "image_start": image}),
        ("flf2v", "tiny-flf2v", {**video, "image_start": image, "image_end": image[::-1]}),
        ("vace", "tiny-vace", {**video, "video_guide": guide}),
        ("single_image", "tiny-t2v", common),
        ("flux", "tiny-flux", common),
        ("magic_edit", "tiny-flux-kontext", {**common, "image_url": image, "prompt": "make it red"}),
    ]


def run(repeats: int, frames: int, size: str, steps: int, tiny_dir: Path) -> list[dict]:
    from Wan2GP.catalog import Catalog
    from Wan2GP.engine import Engine
    from Wan2GP.tiny import ensure_tiny_models

    start = time.perf_counter()
    ensure_tiny_models(tiny_dir)
    build = time.perf_counter() - start
    catalog = Catalog.load(tiny_dir=tiny_dir)
    rows = []
    for task_type, model, params in _tasks(frames, size, steps):
        engine = Engine(device="cpu", catalog=catalog, lora_dirs=[])
        cold = engine.generate(task_type, {**params, "model": model})
        warm = []
        for _ in range(repeats):
            start = time.perf_counter()
            artifact = engine.generate(task_type, {**params, "model": model})
            warm.append((artifact.metadata["timings"], time.perf_counter() - start))
        phases = ("encode_prompt", "denoise", "decode", "encode_file")
        row = {"task_type": task_type, "model": model, "frames": cold.metadata["frames"]}
        row["load_ms"] = cold.metadata["timings"]["load"] * 1000
        for phase in phases:
            row[f"{phase}_ms"] = statistics.median(t[phase] for t, _ in warm) * 1000
        row["total_ms"] = statistics.median(total for _, total in warm) * 1000
        row["bytes"] = len(artifact.data)
        rows.append(row)
    rows.append({"task_type": "(build all tiny models)", "load_ms": build * 1000})
    return rows


def table(rows: list[dict]) -> str:
    columns = ["task_type", "model", "frames", "load_ms", "encode_prompt_ms", "denoise_ms", "decode_ms",
               "encode_file_ms", "total_ms"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.1f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = one core)")
    parser.add_argument("--tiny-dir", type=Path, default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = args.tiny_dir or Path(tmp)
        rows = run(args.repeats, args.frames, args.size, args.steps, tiny_dir)
    print(f"tiny models, CPU, {torch.get_num_threads()} thread(s), {args.steps} steps, {args.size}")
    print(table(rows))


if __name__ == "__main__":
    main()
