"""Mixture-of-experts figures on one GPU (issue #26), random weights at Qwen3-30B-A3B sizes, baselines in-process.

    python benchmarks/moe_gpu.py [--preset qwen3-30b-a3b] [--skip a,b] [--json FILE]

1. correctness: tiny random Qwen3-MoE / Mixtral checkpoints, the runtime on CUDA (Triton MoE kernels: grouped
   GEMM in prefill, expert GEMV in decode) vs transformers on CUDA in fp32; a tiny W4 / W8 MoE engine's logits on
   CUDA vs the CPU reference path;
2. latency: batch 1, 512 in / 256 out, bf16 / W8 / W4 g128 engines built in GPU memory, and transformers' own
   MoE (bf16) in the same process; one decode step's GPU time by kernel kind;
3. throughput: 256 requests of 512 in / 256 out, bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmconvert.load.random_weights import RandomModel, config_from  # noqa: E402
from lmconvert.runtime import LLMEngine, SamplingParams  # noqa: E402
from lmconvert.runtime.bench import hf_generate_tok_s, run_bench  # noqa: E402
from runtime_gpu import decode_step_profile, free  # noqa: E402

W4, W8 = {"bits": 4, "group_size": 128}, {"bits": 8, "group_size": None}


def check_correctness() -> dict:
    from tiny_models import build_checkpoint
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ("qwen3_moe", "mixtral"):
        ckpt = build_checkpoint(arch, Path(tempfile.mkdtemp()) / arch)
        ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        ref_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids], device="cuda")).logits[0]
            gen_ref = ref_model.generate(torch.tensor([ids[:12]], device="cuda"), max_new_tokens=24,
                                         min_new_tokens=24, do_sample=False)[0, 12:].tolist()
        engine = LLMEngine(str(ckpt), device="cuda", dtype="fp32", num_cache_tokens=2048, block_size=16,
                           max_batch_size=4, session_len=256)
        gen = engine.generate([ids[:12]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
        out[arch] = {"max_abs_logit_diff": (engine.logits(ids) - ref).abs().max().item(), "greedy_equal": gen == gen_ref}
        del engine, ref_model
        free()
    cfg = config_from("qwen3-30b-a3b", "bf16")
    for field, value in dict(num_layers=2, vocab_size=2048).items():
        setattr(cfg, field, value)
    ids = list(range(100, 164))
    for name, quant in (("w4g128", W4), ("w8", W8), ("bf16", None)):
        cpu = LLMEngine(RandomModel(cfg, quant), device="cpu", num_cache_tokens=512, dtype="bf16").logits(ids)
        gpu = LLMEngine(RandomModel(cfg, quant), device="cuda", num_cache_tokens=512, dtype="bf16").logits(ids).cpu()
        out[f"2-layer 30B-shape {name}: rel logit err cuda vs cpu"] = ((gpu - cpu).norm() / cpu.norm()).item()
        free()
    return out


def engine_for(preset: str, quant: dict | None, max_batch_size: int, session_len: int) -> LLMEngine:
    return LLMEngine(RandomModel(config_from(preset), quant, device="cuda"), device="cuda",
                     max_batch_size=max_batch_size, session_len=session_len, max_num_batched_tokens=8192)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--skip", default="", help="comma list: correctness,latency,hf,profile,throughput")
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", help="decode configs from moe_kernels.py --configs-out (its sweep's best)")
    ap.add_argument("--max-batch", default="128", help="throughput: comma list of max batch sizes")
    ap.add_argument("--formats", default="w4g128,bf16,w8", help="latency: comma list of w4g128, bf16, w8")
    args = ap.parse_args()
    if args.configs:
        from lmconvert.kernels import moe_triton

        for key, cfg in json.loads(Path(args.configs).read_text())["decode"]:
            moe_triton.DECODE_CONFIGS[tuple(key)] = moe_triton.DecodeConfig(*cfg)
    skip = set(args.skip.split(","))
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    if "correctness" not in skip:
        results["correctness"] = check_correctness()
        print("correctness", results["correctness"], flush=True)
        save()
    if "latency" not in skip:
        for name in args.formats.split(","):
            quant = {"w4g128": W4, "bf16": None, "w8": W8}[name]
            engine = engine_for(args.preset, quant, 8, 1024)
            r = run_bench(engine, "latency", 1, 512, args.out_len)
            results[f"latency_{name}"] = r.as_dict()
            print(name, f"decode {r.decode_tok_s:.1f} tok/s, ttft {r.ttft_p50_ms:.1f} ms", flush=True)
            if "profile" not in skip and name != "w8":
                results[f"decode_step_profile_{name}"] = decode_step_profile(engine)
                print("profile", name, results[f"decode_step_profile_{name}"], flush=True)
            spec = (engine.config, engine.device, engine.dtype)
            del engine
            free()
            if name == "bf16" and "hf" not in skip:
                results["latency_transformers_bf16_tok_s"] = hf_generate_tok_s(*spec, 1, 512, 64)
                print("transformers bf16", results["latency_transformers_bf16_tok_s"], flush=True)
                free()
            save()
    if "throughput" not in skip:
        for max_batch in map(int, args.max_batch.split(",")):
            engine = engine_for(args.preset, None, max_batch, 1024)
            r = run_bench(engine, "throughput", 256, 512, args.out_len)
            key = "throughput_bf16_256x512_256" + ("" if max_batch == 128 else f"_batch{max_batch}")
            results[key] = r.as_dict()
            print("throughput bf16 max batch", max_batch, f"{r.output_tok_s:.0f} output tok/s", flush=True)
            del engine
            free()
            save()
    save()


if __name__ == "__main__":
    main()
