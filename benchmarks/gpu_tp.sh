#!/usr/bin/env bash
# One device call on a 4-GPU host (GPUS=2: a 2-GPU host, phases below the first block): tensor-parallel scaling
# at three sizes, sizes side by side on disjoint GPUs.
#   OUT=/some/dir [GPUS=2] bash benchmarks/gpu_tp.sh   (7-9.5 minutes; each run has its own time limit)
# Phase 1: Qwen3-8B bf16 tp=1 (GPU 0) | tp=2 (GPUs 1,2) | Qwen2.5-72B W4 tp=1 (GPU 3)
# Phase 2: Qwen3-32B bf16 tp=2 (GPUs 0,1) | Qwen2.5-72B W4 tp=2 (GPUs 2,3)
# Phase 3: Qwen3-32B bf16 tp=4;  phase 4: Qwen2.5-72B W4 tp=4.  Then one scaling report per model.
# Every run: batch-1 latency (512 in / 256 out), rank 0's decode step by kernel kind, 256 requests at once.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lmconvert-tp}
mkdir -p "$OUT"
export PYTHONPATH=$(bash benchmarks/device_setup.sh) PYTHONFAULTHANDLER=1 PYTHONSAFEPATH=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
nvidia-smi topo -m > "$OUT/topology.txt" 2>&1

run() {  # run NAME GPUS SECONDS tp_gpu.py-ARGS...
  local name=$1 gpus=$2 limit=$3; shift 3
  local start=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 15 -s ABRT "$limit" python3 benchmarks/tp_gpu.py "$@" --throughput 256 \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s" | tee -a "$OUT/runs.txt"
}
settle() { wait; pkill -9 -f benchmarks/tp_gpu.py; sleep 2; }  # a killed run's workers must not hold GPUs

if [ "${GPUS:-4}" = 2 ]; then  # a 2-GPU host: tp=1 vs tp=2 for each size that fits one GPU, 32B at tp=2 only
  run 8b_tp1 0 ${LIMIT_PHASE1:-165} --preset qwen3-8b --tp 1 &
  run 72b_w4_tp1 1 ${LIMIT_PHASE1:-165} --preset qwen2.5-72b-awq --quant w4 --tp 1 &
  settle
  run 8b_tp2 0,1 ${LIMIT_PHASE2:-130} --preset qwen3-8b --tp 2
  settle
  run 72b_w4_tp2 0,1 ${LIMIT_PHASE3:-140} --preset qwen2.5-72b-awq --quant w4 --tp 2
  settle
  run 32b_tp2 0,1 ${LIMIT_PHASE4:-140} --preset qwen3-32b --tp 2
  settle
else
  run 8b_tp1 0 ${LIMIT_PHASE1:-165} --preset qwen3-8b --tp 1 &
  run 8b_tp2 1,2 ${LIMIT_PHASE1:-165} --preset qwen3-8b --tp 2 &
  run 72b_w4_tp1 3 ${LIMIT_72B_TP1:-240} --preset qwen2.5-72b-awq --quant w4 --tp 1 &  # 165 s was too short (session 9)
  settle
  run 32b_tp2 0,1 ${LIMIT_PHASE2:-165} --preset qwen3-32b --tp 2 &
  run 72b_w4_tp2 2,3 ${LIMIT_PHASE2:-165} --preset qwen2.5-72b-awq --quant w4 --tp 2 &
  settle
  run 32b_tp4 0,1,2,3 ${LIMIT_PHASE3:-125} --preset qwen3-32b --tp 4
  settle
  run 72b_w4_tp4 0,1,2,3 ${LIMIT_PHASE4:-125} --preset qwen2.5-72b-awq --quant w4 --tp 4
  settle
fi
for model in 8b 32b 72b_w4; do
  files=$(ls "$OUT/${model}_tp"*.json 2>/dev/null)
  [ -n "$files" ] && python3 benchmarks/tp_gpu.py --report $files > "$OUT/report_$model.json" 2>&1
done
grep -h -A12 '"scaling"' "$OUT"/report_*.json | grep -v '^ *[{}],\?$' | tr -d ' \n'; echo
