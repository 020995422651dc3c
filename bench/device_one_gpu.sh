#!/usr/bin/env bash
# Issue 21 (+ the one-GPU checks of issue 22) on nvidia-h200 (one device call, ~9 min): bench.served_gpu, then the
# split VAE decode's error at full size and the split MP4 encode. Carry .whl. Logs and JSON under $OUT.
set -o pipefail
mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HWGP_BENCH_MODELS=/tmp/hwgp-models HWGP_CACHE_DIR=/tmp/hwgp-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
show() { grep --line-buffered -vE 'Warning|warn\(|^\s*$|Loading|it/s\]|experimental feature' ; }
nvidia-smi -L; python3 -c 'import torch, diffusers; print(torch.__version__, diffusers.__version__)'
python3 -c 'import flash_attn' 2>/dev/null && echo flash-attn present || echo flash-attn absent
timeout ${SERVED_S:-450} python3 -m bench.served_gpu --steps 10 --long-steps 50 --calib-steps 20 --multiplier 3.0 \
  --json "$OUT/served.json" 2>&1 | tee "$OUT/served.log" | show
timeout ${CHECKS_S:-110} python3 -m bench.multi_gpu_video --one-gpu-checks --gpus 2 2>&1 | tee "$OUT/checks.log" | show
