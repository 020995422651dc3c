"""What a transfer through the host costs on this GPU host: the path NCCL falls back to between two ranks
that cannot reach each other's GPU directly (each seeing only its own; docs/performance.md, "Two GPUs").

    python -m bench.host_copy [--gigabytes 3.78] [--pieces 32]

Defaults: the split VAE decode's hand-over at 832x480 (the decoder's causal caches, 32 float32 tensors).
Times, best of 3, each between device syncs: device to pinned host, pinned host to device, device to pageable
host, and a copy within the GPU (the upper bound a direct path approaches).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=3.78)
    parser.add_argument("--pieces", type=int, default=32)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.host_copy: needs a CUDA GPU")
    device = torch.device("cuda:0")
    floats = int(args.gigabytes * 1e9) // args.pieces // 4
    on_gpu = [torch.randn(floats, device=device) for _ in range(args.pieces)]
    pinned = [torch.empty(floats, pin_memory=True) for _ in range(args.pieces)]
    pageable = [torch.empty(floats) for _ in range(args.pieces)]
    back = [torch.empty(floats, device=device) for _ in range(args.pieces)]

    def best_of_3(copy) -> float:
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    def copy_all(targets, sources, non_blocking: bool = False):
        return lambda: [t.copy_(s, non_blocking=non_blocking) for t, s in zip(targets, sources, strict=True)]

    runs = {
        "device to pinned host": copy_all(pinned, on_gpu, non_blocking=True),
        "pinned host to device": copy_all(back, pinned, non_blocking=True),
        "device to pageable host": copy_all(pageable, on_gpu),
        "within the GPU": copy_all(back, on_gpu),
    }
    size = args.pieces * floats * 4 / 1e9
    print(
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: {size:.2f} GB in {args.pieces} pieces"
    )
    for name, copy in runs.items():
        seconds = best_of_3(copy)
        print(f"{name}: {seconds:.3f}s ({size / seconds:.1f} GB/s)")


if __name__ == "__main__":
    main()
