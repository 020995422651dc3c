#!/usr/bin/env bash
# Issue 22 on nvidia-h200-x2, device calls of ≤ 9 min on one warm machine (the random weights built by
# the first stay under /tmp for the next ones while it is held):
#   PART=1: one video through the 2-GPU replica at 10 and 50 steps, + the replica with nothing but denoising
#           split (~5 min measured on 2026-11-30; VIEWS=replica,own times both GPU views of the rank
#           workers, ~3 min more), then the VAE decode and MP4 encode alone, split vs whole;
#   PART=2: the VACE inputs' conversion on the GPU vs diffusers' PIL path (bench.vace_inputs), then travel on
#           2 GPUs vs 1 (independent and chained; three layouts, each built and warmed);
#   PART=4: the split decode of a chained segment's size (33 frames), the ranks seeing every GPU vs each its
#           own, and each its own in Ray actors (NCCL's transport in nccl.txt), then chained travel on 1 GPU,
#           split (rank workers seeing both GPUs, gpu_view: replica, the default) and split-own (each seeing
#           its own, gpu_view: own); row times in the DBs;
#   PART=3: replica scaling, 16 tasks queued on 1 then 2 one-GPU replicas (STEPS, default 50), timed to
#           the FIRST·N-th completion (default 2: ~2 x 132 s; the whole queue at 50 steps needs ~18 min);
#   PART=5 (one GPU, nvidia-h200): the split decode's per-rank work (33 frames), then the split decode with its
#           2 ranks sharing the GPU over gloo, as plain processes and as threaded Ray actors (the service's way).
# Carry .whl (../shared/tools/make_device_site.sh .whl, plus the psycopg_pool wheel). Logs and JSON under $OUT.
set -o pipefail
mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit 1
for w in .whl/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done  # e.g. psycopg_pool
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HWGP_BENCH_MODELS=/tmp/hwgp-models
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
show() { grep --line-buffered -E '^\||^#|GPU|travel:|travel [0-9]|built|goal|speed-up|decode alone|VAE decode|MP4 encode|replica\(s\)|ratio|Error|error:|Traceback' ; }
nvidia-smi -L; python3 -c 'import torch, diffusers, ray; print(torch.__version__, diffusers.__version__, ray.__version__)'
case "${PART:-1}" in
1) timeout ${VIDEO_S:-400} python3 -m bench.multi_gpu_video --gpus 2 --steps 10,50 --compare-whole --gpu-views ${VIEWS:-replica} \
     --json "$OUT/video.json" 2>&1 | tee "$OUT/video.log" | show
   timeout ${DECODE_S:-150} python3 -m bench.multi_gpu_video --gpus 2 --steps 2 --decode-only \
     --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | show ;;
2) timeout 60 python3 -m bench.vace_inputs --device cuda 2>&1 | tee "$OUT/vace_inputs.log" | show
   timeout ${TRAVEL_S:-500} python3 -m bench.parallel_travel --gpus 2 --segments 4 --frames 33 --steps 6 \
     --json "$OUT/travel.json" 2>&1 | tee "$OUT/travel.log" | show ;;
3) timeout ${SCALE_S:-540} python3 -m bench.scale_out --gpus 2 --tasks-per-gpu 8 --steps ${STEPS:-50} --measure-first ${FIRST:-2} \
     --json "$OUT/scale.json" 2>&1 | tee "$OUT/scale.log" | show ;;
4) export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P
   timeout 260 python3 -m bench.multi_gpu_video --gpus 2 --steps 2 --frames 33 --decode-only \
     2>&1 | tee "$OUT/decode33.log" | show
   timeout ${TRAVEL_S:-360} python3 -m bench.parallel_travel --gpus 2 --segments 4 --frames 33 --steps 6 \
     --layouts 1gpu,split,split-own --modes chained --json "$OUT/chained.json" 2>&1 | tee "$OUT/chained.log" | show
   { nvidia-smi topo -m
     { grep -h " via \|P2P is" "$OUT/decode33.log"; grep -rh " via \|P2P is" /tmp/ray/session_*/logs/ 2>/dev/null; } \
       | sed 's/^.*NCCL INFO //' | sort | uniq -c | sort -rn | head -60; } > "$OUT/nccl.txt"; cat "$OUT/nccl.txt"
   for db in /tmp/hwgp-ptravel-*/tasks-*.db; do cp "$db" "$OUT/"; done ;;
5) timeout ${CHECK_S:-330} python3 -m bench.multi_gpu_video --gpus 2 --frames 33 --one-gpu-checks \
     2>&1 | tee "$OUT/onegpu.log" | show ;;
esac
