"""Quick CUDA correctness checks of the runtime's Triton paths (tiny random models vs transformers, int8 KV
through the cache, W4 / W8 decode vs prefill logits), runtime_gpu.py's checks without its long runs.

    python benchmarks/cuda_checks.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_gpu import check_correctness, kv_int8_logits_errors, quant_decode_logits_errors  # noqa: E402

if __name__ == "__main__":
    print(json.dumps({"correctness": check_correctness(), "kv_int8_logits_rel_err": kv_int8_logits_errors(),
                      "quant_decode_logits_rel_err": quant_decode_logits_errors()}))
