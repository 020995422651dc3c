"""Cost of structure-guidance preprocessing per frame on CPU: raw (baseline: sample + resize), canny, flow.

    python -m bench.structure_preprocess [--frames 33] [--width 832] [--height 480] [--repeats 3]

Builds a synthetic structure video (a textured square moving over a textured background, at twice the
output size so the resize does real work), then times `build_control_video` for each structure type in
the same run. Prints milliseconds per output frame (median of the repeats) and the machine. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import cv2
import numpy as np

from Wan2GP.structure import build_control_video, parse_structure_guidance


def structure_video(frames: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    patch = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    video = np.repeat(background[np.newaxis], frames, axis=0)
    for t in range(frames):
        top, left = height // 3, (width // 8 + 6 * t) % (width - patch.shape[1])
        video[t, top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = structure_video(args.frames + 1, args.width * 2, args.height * 2)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OpenCV {cv2.__version__}, threads {cv2.getNumThreads()}")  # fmt: skip
    print(
        f"{args.frames} output frames at {args.width}x{args.height} from a {source.shape[2]}x{source.shape[1]} video"
    )
    for structure_type in ("raw", "canny", "flow"):
        guidance = parse_structure_guidance(
            {"structure_type": structure_type, "structure_video_path": "synthetic"}
        )
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            build_control_video(
                guidance, args.frames, args.width, args.height, 16, lambda path: (source, 16.0)
            )
            times.append(time.perf_counter() - start)
        per_frame = statistics.median(times) / args.frames * 1000
        print(
            f"{structure_type:6s} {per_frame:8.1f} ms/frame  (median of {args.repeats}: {statistics.median(times):.2f} s)"
        )


if __name__ == "__main__":
    main()
