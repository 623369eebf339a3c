#!/usr/bin/env bash
# One device call, one GPU: every single-GPU figure of the kernel, runtime, W8A8 and int8-KV issues.
#   OUT=/some/dir bash benchmarks/gpu_single.sh      (the device tool sets OUT)
# Each part has its own time limit, writes its log and JSON under $OUT as it goes, and a failing part
# does not stop the next. Budget: about 9.7 minutes in all (WITH_LINEARS=1 adds the W4/W8 decode linears,
# SKIP_NCU=1 drops the ncu profile of the attention kernel).
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
part w8a8 ${LIMIT_W8A8:-80} python3 benchmarks/kernel_bench.py --w8a8 --json "$OUT/kernels_w8a8.json"
part attention ${LIMIT_ATTENTION:-110} python3 benchmarks/kernel_bench.py --attention --attention-sweep --json "$OUT/kernels_attention.json"
part runtime ${LIMIT_RUNTIME:-320} python3 benchmarks/runtime_gpu.py --json "$OUT/runtime.json"
[ -n "${WITH_LINEARS:-}" ] && part linears ${LIMIT_LINEARS:-120} python3 benchmarks/kernel_bench.py --decode --json "$OUT/kernels_decode.json"
[ -z "${SKIP_NCU:-}" ] && part ncu_attention ${LIMIT_NCU:-70} ncu --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 5 \
  --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
  python3 benchmarks/ncu_attention.py
