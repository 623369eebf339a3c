#!/usr/bin/env bash
# One device call, one GPU: the MoE figures of issue #26 (kernels, then Qwen3-30B-A3B runtime), each part time-limited.
#   OUT=/some/dir bash benchmarks/gpu_moe.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lmconvert-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$(bash benchmarks/device_setup.sh) PYTHONFAULTHANDLER=1 PYTHONSAFEPATH=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__)'; } > "$OUT/versions.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s" | tee -a "$OUT/parts.txt"
}
# the kernel sweep's best decode configs go on to the runtime parts (benchmarks only: the library keeps its table)
part moe_kernels ${LIMIT_KERNELS:-240} python3 benchmarks/moe_kernels.py \
    --configs-out "$OUT/moe_configs.json" ${KERNEL_ARGS:-}
configs=(); [ -s "$OUT/moe_configs.json" ] && configs=(--configs "$OUT/moe_configs.json")
part moe_runtime ${LIMIT_RUNTIME:-330} python3 benchmarks/moe_gpu.py --skip throughput "${configs[@]}" ${RUNTIME_ARGS:-} \
    --json "$OUT/moe_runtime.json"
part moe_throughput ${LIMIT_THROUGHPUT:-160} python3 benchmarks/moe_gpu.py --skip correctness,latency \
    --max-batch ${MAX_BATCH:-128,256} --json "$OUT/moe_throughput.json"
