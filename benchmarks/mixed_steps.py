"""Mixed prefill + decode steps: their decode rows through the decode kernel (`decode_rows`, the default) or,
as before session 5, through the prefill kernel with the rest of the step. Same engine, both ways, in turn.

    export PYTHONPATH=$(bash benchmarks/device_setup.sh)
    python benchmarks/mixed_steps.py [--preset qwen3-8b] [--json FILE]

Runs (random weights, max 8192 batched tokens a step, as runtime_gpu.py): 256 requests of 512 in / 256 out
(bf16 KV), then 64 requests of 4096 in / 256 out with bf16 KV and with int8 KV (issue #8's end-to-end pair).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_gpu import engine_for, free  # noqa: E402

import lmconvert.runtime.context as context  # noqa: E402
from lmconvert.runtime.bench import run_bench  # noqa: E402

SPLIT = context.leading_decodes  # what context.query_hints counts the decode rows with


def measure(engine, split: bool, n: int, input_len: int, output_len: int, seed: int) -> dict:
    context.leading_decodes = SPLIT if split else (lambda cu: 0)
    try:
        r = run_bench(engine, "throughput", n, input_len, output_len, seed=seed).as_dict()  # new prompts: no prefix hits
    finally:
        context.leading_decodes = SPLIT
    print(f"{n} x {input_len}/{output_len} kv {r['kv_cache']} decode rows {'split' if split else 'in prefill'}: "
          f"{r['output_tok_s']:.0f} out tok/s, ttft p50 {r['ttft_p50_ms']:.0f} ms, itl p50 {r['itl_p50_ms']:.1f} ms",
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = {}
    for kv_int8, runs in ((False, [(256, 512), (64, 4096)]), (True, [(64, 4096)])):
        engine = engine_for(args.preset, None, 256, 4096 + 256 + 16, kv_int8)
        for n, input_len in runs:
            for split in (False, True):
                key = f"{n}x{input_len} {'int8' if kv_int8 else 'bf16'} {'split' if split else 'prefill'}"
                rows[key] = measure(engine, split, n, input_len, 256, seed=len(rows) + 10)
        del engine
        free()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
