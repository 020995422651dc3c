#!/usr/bin/env bash
# Issue 21 on one GPU, in two device calls (~9 min each) on a machine kept warm between them (the second
# reuses the first's random weights, MagCache ratios and inductor cache under /tmp, when still there):
#   PART=1: bench.served_gpu (engine rows: bare eager, exact, attention backends, compiled, distilled,
#           MagCache), then bench.gpu_probes' 14B section;
#   PART=2: bench.served_e2e (the same through the service, POST -> Complete, compiled; a fresh replica's
#           first compiled task reads the inductor cache part 1 left: warm start) and the never-idle queue,
#   PART=3: bench.gpu_probes' VAE decode variants.
# Carry .whl. Logs and JSON under $OUT.
set -o pipefail
mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit 1
for w in .whl/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done  # e.g. psycopg_pool
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HWGP_BENCH_MODELS=/tmp/hwgp-models HWGP_CACHE_DIR=/tmp/hwgp-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
show() { grep --line-buffered -vE '^W[0-9]{4} |Warning|warn\(|^\s*$|Loading|it/s\]|experimental feature|INFO|raylet|float32: \[\]' ; }
nvidia-smi -L; python3 -c 'import torch, diffusers, ray; print(torch.__version__, diffusers.__version__, ray.__version__)'
ls /tmp/hwgp-models /tmp/hwgp-cache 2>/dev/null | head
if [ "${PART:-1}" = 1 ]; then
  timeout ${SERVED_S:-430} python3 -m bench.served_gpu --steps 10 --long-steps 50 --calib-steps 20 \
    --multiplier 3.0 --json "$OUT/served.json" 2>&1 | tee "$OUT/served.log" | show
  timeout ${PROBES_S:-100} python3 -m bench.gpu_probes --sections 14b --json "$OUT/probes14b.json" 2>&1 \
    | tee "$OUT/probes14b.log" | show
elif [ "${PART:-1}" = 2 ]; then
  timeout ${E2E_S:-330} python3 -m bench.served_e2e --compile --nvml-index 0 --json "$OUT/e2e.json" 2>&1 \
    | tee "$OUT/e2e.log" | show
fi
if [ "${PART:-1}" = 3 ]; then
  timeout ${PROBES_S:-200} python3 -m bench.gpu_probes --sections vae,vae-compile --json "$OUT/vae.json" 2>&1 \
    | tee "$OUT/vae.log" | show
fi
