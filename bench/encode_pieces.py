"""The MP4 encode of one video: whole, or in N pieces encoded at once and joined without re-encoding.

    python -m bench.encode_pieces [--frames 81] [--resolution 832x480] [--pieces 1,2,3,4,6,8] [--repeats 3]

libx264 spreads one encode over a few threads; at 832x480 it leaves most cores of a GPU host idle. Pieces
(`Wan2GP.video.encode_mp4` each, `join_mp4` as a stream copy) use more of them, at the cost of a key frame
per join. The frames are a moving pattern with noise (random-weight models give noise-like frames, which are
slower to encode than real video). Prints the median seconds per piece count, the file size, and the decoded
frames' mean absolute error against the source (the codec's loss; the joins add key frames, not error). Not a
test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from Wan2GP.video import MIN_JOIN_FRAMES, decode_video, encode_mp4, join_mp4


def frames_like_a_render(count: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        pattern = np.stack(
            [128 + 100 * np.sin((x + 6 * t) / 60), 128 + 90 * np.cos((y - 3 * t) / 45 + x / 200),
             100 + 80 * np.sin((x + y + 4 * t) / 80)], axis=-1,
        )  # fmt: skip
        out[t] = np.clip(pattern + rng.normal(0, 4, pattern.shape), 0, 255)
    return out


def encode_in_pieces(frames: np.ndarray, pieces: int, fps: int, pool: ThreadPoolExecutor) -> bytes:
    bounds = [len(frames) * i // pieces for i in range(pieces + 1)]
    parts = list(pool.map(lambda i: encode_mp4(frames[bounds[i] : bounds[i + 1]], fps=fps), range(pieces)))
    return join_mp4(parts, [b - a for a, b in zip(bounds, bounds[1:], strict=False)], fps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--resolution", default="832x480")
    parser.add_argument("--pieces", default="1,2,3,4,6,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(v) for v in args.resolution.split("x"))
    frames = frames_like_a_render(args.frames, width, height)
    # Always with 1 (the whole video, what the others are compared with); pieces of 3 frames at least.
    counts = sorted(
        {1, *(int(v) for v in args.pieces.split(",") if args.frames // int(v) >= MIN_JOIN_FRAMES)}
    )
    print(
        f"# MP4 encode, {args.frames} frames at {args.resolution}; {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("| pieces | median s | vs whole | MB | mean abs error |")
    print("|---:|---:|---:|---:|---:|")
    whole = None
    with ThreadPoolExecutor(max(counts)) as pool:
        for count in counts:
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                data = encode_in_pieces(frames, count, 16, pool)
                seconds.append(time.perf_counter() - started)
            median = statistics.median(seconds)
            whole = whole or median
            decoded, _ = decode_video(data)
            error = float(np.abs(decoded.astype(np.int16) - frames).mean())
            print(f"| {count} | {median:.2f} | {whole / median:.2f}x | {len(data) / 1e6:.2f} | {error:.2f} |")


if __name__ == "__main__":
    main()
