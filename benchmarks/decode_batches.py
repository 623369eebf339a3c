"""Small-batch decode against the memory roofline (issue #29), random weights at a real size, one process.

    python benchmarks/decode_batches.py [--preset qwen3-8b] [--formats bf16,w8,w4g128,w4g128_head]
                                        [--batches 1,4,8] [--json FILE]

Per weight format: the bytes a decode step must read (the engine's weights: every linear, the head and the
embedding row; the KV cache is small at 512 tokens), the roofline at this card's copy bandwidth measured in
the same process, and the decode rate per sequence at each batch size (`run_bench`: batch 1 is the latency
mode a user runs, batch b is b requests of 512 in / 256 out decoding together), with its share of the
roofline and its ratio to batch 1. Then one batch-1 step's GPU time by kernel kind and launches a step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_bench import copy_gbps  # noqa: E402
from runtime_gpu import W4, W4_HEAD, W8, decode_step_profile, engine_for, free  # noqa: E402

from lmconvert.runtime.bench import run_bench  # noqa: E402

FORMATS = {"bf16": None, "w8": W8, "w4g128": W4, "w4g128_head": W4_HEAD}


def step_bytes(engine) -> int:
    """Bytes of weights one decode step reads: every tensor the model holds but the KV pools, the rope table
    and the embedding table (of which it reads one row; a tied head reads it all)."""
    from lmconvert.runtime.compiled_decode import KV_POOLS, model_tensors

    model = engine.runner.model
    seen, total = set(), 0
    for module, name in model_tensors(model):
        tensor = getattr(module, name)
        if name in KV_POOLS or name == "rope_cache" or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    embed = model.embed_tokens
    if not model.config.tie_word_embeddings:
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--formats", default="bf16,w8,w4g128,w4g128_head")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    copy = copy_gbps()
    results: dict = {"device": torch.cuda.get_device_name(), "copy_gbps": copy, "preset": args.preset}
    print("copy GB/s", round(copy), flush=True)
    for name in args.formats.split(","):
        batches = [int(b) for b in args.batches.split(",")]
        engine = engine_for(args.preset, FORMATS[name], max(batches), 1024)
        nbytes = step_bytes(engine)
        roofline = copy * 1e9 / nbytes
        row = {"step_gb": nbytes / 1e9, "roofline_tok_s": roofline}
        for bs in batches:
            r = run_bench(engine, "latency" if bs == 1 else "throughput", bs, 512, args.out_len)
            row[f"b{bs}_tok_s_per_seq"] = r.decode_tok_s
            row[f"b{bs}_of_roofline"] = r.decode_tok_s / roofline
        for bs in batches[1:]:
            row[f"b{bs}_vs_b1"] = row[f"b{bs}_tok_s_per_seq"] / row[f"b{batches[0]}_tok_s_per_seq"]
        row["profile_b1"] = decode_step_profile(engine)
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "profile_b1"}), flush=True)
        print(name, "profile", json.dumps(row["profile_b1"]), flush=True)
        del engine
        free()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
