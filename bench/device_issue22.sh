#!/usr/bin/env bash
# Issue 22 on nvidia-h200-x2 (one device call, ~9 min): one video through the 2-GPU replica at 10 and 50 steps
# (+ the replica with nothing but denoising split, + the VAE decode alone), then travel on 2 GPUs vs 1.
# Carry .whl (../shared/tools/make_device_site.sh .whl). Logs and JSON under $OUT.
set -o pipefail
mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit 1
for w in .whl/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done  # e.g. psycopg_pool
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HWGP_BENCH_MODELS=/tmp/hwgp-models
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
show() { grep --line-buffered -E '^\||^#|GPU|travel:|built|goal|speed-up|decode alone|Error|error:|Traceback' ; }
nvidia-smi -L; python3 -c 'import torch, diffusers, ray; print(torch.__version__, diffusers.__version__, ray.__version__)'
timeout ${VIDEO_S:-360} python3 -m bench.multi_gpu_video --gpus 2 --steps 10,50 --compare-whole --decode-check \
  --json "$OUT/video.json" 2>&1 | tee "$OUT/video.log" | show
timeout ${TRAVEL_S:-225} python3 -m bench.parallel_travel --gpus 2 --segments 4 --frames 33 --steps 6 \
  --json "$OUT/travel.json" 2>&1 | tee "$OUT/travel.log" | show
