"""GPU runtime figures at real sizes with random weights (Qwen3-8B config), baselines in the same process.

    python benchmarks/runtime_gpu.py [--preset qwen3-8b] [--quick] [--json FILE]

1. correctness: tiny random checkpoints, runtime on CUDA (Triton paths) vs transformers on CUDA, and W4 / W8
   decode-path logits (split-K sums finished by the next kernel, PDL) vs the cache-free pass;
2. batch-1 latency (512 in / 256 out) for bf16, W8, W4 g128, W8A8, W8 / W4 with a quantized lm_head, and
   transformers bf16;
3. throughput: 256 requests of 512 in / 256 out (bf16 and W8A8), and transformers at batch 16;
4. steady decode: CUDA memory segments allocated during 200 decode steps (should be 0), Triton kernels
   compiled during them (should be 0), and where one decode step's GPU time goes (torch profiler);
5. memory: allocated / reserved CUDA memory after every 100 of 1000 requests (should stay flat);
6. kvint8: int8 KV vs bf16 KV — tiny models' logits on CUDA (Triton store / attention) vs the fp cache-free
   pass, then throughput of 64 requests of 4096 in / 256 out with each cache (and the tokens each holds).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lmconvert.load.random_weights import RandomModel, config_from  # noqa: E402
from lmconvert.runtime import LLMEngine, SamplingParams  # noqa: E402
from lmconvert.runtime.bench import hf_generate_tok_s, run_bench  # noqa: E402


def check_correctness() -> dict:
    from tiny_models import build_checkpoint
    from transformers import AutoModelForCausalLM

    errors = {}
    for arch in ("qwen3", "qwen2", "llama", "mistral"):
        ckpt = build_checkpoint(arch, Path(tempfile.mkdtemp()) / arch)
        ids = torch.randint(3, 300, (1, 40)).tolist()[0]
        ref_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids], device="cuda")).logits[0]
            gen_ref = ref_model.generate(torch.tensor([ids[:12]], device="cuda"), max_new_tokens=24, min_new_tokens=24,
                                         do_sample=False)[0, 12:].tolist()
        engine = LLMEngine(str(ckpt), device="cuda", dtype="fp32", num_cache_tokens=2048, block_size=16,
                           max_batch_size=4, session_len=256)
        ours = engine.logits(ids)
        out = engine.generate([ids[:12]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
        # Tiny random models have near-ties; tf32 dots in the paged kernels may flip one. So: at each step our
        # token must be within 1e-3 of the best logit transformers gives over our own sequence.
        with torch.no_grad():
            full = ref_model(torch.tensor([ids[:12] + out.token_ids], device="cuda")).logits[0, 11:-1]
        picked = full.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        gap = (full.max(dim=1).values - picked).max().item()
        errors[arch] = {"max_abs_logit_diff": (ours - ref).abs().max().item(), "greedy_equal": out.token_ids == gen_ref,
                        "worst_greedy_gap": gap}
        del engine, ref_model
    return errors


W8 = {"bits": 8, "group_size": None}
W8A8 = {"bits": 8, "group_size": None, "activation_bits": 8}  # SmoothQuant layout: int8 weights and activations
W4 = {"bits": 4, "group_size": 128}
# the same with lm_head quantized too (`quantize --quant-lm-head`)
W8_HEAD, W4_HEAD = {**W8, "quantize_lm_head": True}, {**W4, "quantize_lm_head": True}


def free():
    gc.collect()
    torch.cuda.empty_cache()


def engine_for(preset: str, quant: dict | None, max_batch_size: int, session_len: int, kv_int8: bool = False,
               ) -> LLMEngine:
    source = RandomModel(config_from(preset), quant, device="cuda")
    return LLMEngine(source, device="cuda", max_batch_size=max_batch_size, session_len=session_len,
                     max_num_batched_tokens=8192, kv_int8=kv_int8)


def kv_int8_logits_errors() -> dict:
    """Relative error of int8-KV logits (through the paged cache: Triton store_kv + prefill) vs the fp32
    cache-free pass, tiny random checkpoints on CUDA; the same with fp KV must be ~1e-6."""
    from tiny_models import build_checkpoint

    errors = {}
    for arch in ("qwen3", "mistral"):
        ckpt = build_checkpoint(arch, Path(tempfile.mkdtemp()) / arch)
        ids = torch.randint(3, 300, (200,)).tolist()
        kw = dict(device="cuda", dtype="fp32", num_cache_tokens=1024, block_size=16, max_num_batched_tokens=64)
        ref = LLMEngine(str(ckpt), **kw).logits(ids)
        for kv_int8 in (False, True):
            engine = LLMEngine(str(ckpt), **kw, kv_int8=kv_int8)
            decoded = torch.cat([out for _, out in engine.score([ids], chunk=1)])  # decode kernel, token by token
            chunked = engine.logits(ids) if kv_int8 else decoded  # prefill kernel, 64-token chunks
            for name, got in (("decode", decoded), ("prefill", chunked)):
                errors[f"{arch} {'int8' if kv_int8 else 'fp32'} KV {name}"] = ((got - ref).norm() / ref.norm()).item()
    return errors


def quant_decode_logits_errors(preset: str = "qwen3-0.6b", n: int = 64) -> dict:
    """Relative error of W4 / W8 decode-path logits (M = 1: split-K GEMVs whose sums the next RMSNorm or
    SiLU-mul finishes, CUDA graphs, PDL) vs the same engine's cache-free pass (M = n: dequant + cuBLAS),
    random bf16 weights; both round to bf16, so ~1e-2 is agreement and a wrong or stale sum shows as ~1."""
    errors = {}
    for name, quant in (("w4g128", W4), ("w8", W8), ("w4g128 lm_head int8", W4_HEAD)):
        engine = engine_for(preset, quant, max_batch_size=4, session_len=512)
        ids = torch.randint(3, 30000, (n,)).tolist()
        ref = engine.runner.logits(ids)
        decoded = torch.cat([out for _, out in engine.score([ids], chunk=1)])
        errors[name] = ((decoded - ref).norm() / ref.norm()).item()
        del engine
        free()
    return errors


def kv_int8_throughput(preset: str, n: int, input_len: int, out_len: int) -> dict:
    rows = {}
    for kv_int8 in (False, True):
        engine = engine_for(preset, None, n, input_len + out_len + 16, kv_int8)
        rows["int8" if kv_int8 else "bf16"] = r = run_bench(engine, "throughput", n, input_len, out_len).as_dict()
        print("kv", r["kv_cache"], f"{r['output_tok_s']:.0f} out tok/s, itl p50 {r['itl_p50_ms']:.1f} ms, "
              f"cache {r['cache_tokens']} tokens", flush=True)
        del engine
        free()
    rows["int8_vs_bf16_out_tok_s"] = rows["int8"]["output_tok_s"] / rows["bf16"]["output_tok_s"]
    rows["int8_vs_bf16_cache_tokens"] = rows["int8"]["cache_tokens"] / rows["bf16"]["cache_tokens"]
    return rows


def steady_decode_segments(engine: LLMEngine, steps: int = 200) -> int:
    engine.add_request(list(range(100, 612)), SamplingParams(max_tokens=steps + 20, temperature=0, ignore_eos=True))
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["segment.all.allocated"] - before


def compiled_triton_kernels() -> int:
    """Number of compiled variants held by every Triton kernel of lmconvert.kernels (grows on a recompile)."""
    import importlib
    import pkgutil

    import lmconvert.kernels as pkg

    total = 0
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"lmconvert.kernels.{info.name}")
        for obj in vars(module).values():
            fn = getattr(obj, "fn", obj)  # autotuned kernels wrap the JITFunction
            caches = getattr(fn, "device_caches", None)
            if caches is not None:  # triton >= 3.2: device -> (kernel cache, ...)
                total += sum(len(c[0]) for c in caches.values())
            elif isinstance(getattr(fn, "cache", None), dict):
                total += sum(len(c) for c in fn.cache.values())
    return total


# (kind, name fragments): the first kind whose fragment is in a kernel's name takes its time
KERNEL_KINDS = (("all-reduce", ("nccl", "allreduce", "all_reduce")),  # first: the fused all-reduce + norm counts here
                ("MoE experts", ("moe", "expert")),
                ("MoE routing", ("softmax", "topk", "sort", "bincount", "cumsum", "scatter", "index")),
                ("attention", ("paged", "attn", "flash", "_decode", "_prefill", "_merge")),
                ("W4/W8 GEMV/GEMM", ("gemv", "w4", "w8", "quant", "dequant")),
                ("cuBLAS GEMM", ("gemm", "nvjet", "cutlass", "sm90", "xmma")), ("norm", ("norm",)), ("rope", ("rope",)),
                ("silu*mul", ("silu",)), ("kv store", ("store_kv",)))


def cuda_kernels(prof, steps: int) -> list[tuple[float, int, str, str]]:
    """(us per step, launches per step, name, kind) of every CUDA kernel a torch profiler saw over `steps` steps."""
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type != torch.autograd.DeviceType.CUDA or not us:
            continue
        kind = next((k for k, pats in KERNEL_KINDS if any(p in evt.key.lower() for p in pats)), "other")
        rows.append((us / steps, evt.count // steps, evt.key, kind))
    return sorted(rows, reverse=True)


def decode_step_profile(engine: LLMEngine, steps: int = 20) -> dict:
    """GPU time of one steady batch-1 decode step by kernel kind (CUDA graph replays; CUPTI sees their kernels)."""
    from torch.profiler import ProfilerActivity, profile

    engine.add_request(list(range(100, 612)), SamplingParams(max_tokens=steps + 40, temperature=0, ignore_eos=True))
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            engine.step()
        end.record()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    kernels = cuda_kernels(prof, steps)
    kinds: dict[str, float] = {}
    for us, _, _, kind in kernels:
        kinds[kind] = kinds.get(kind, 0.0) + us
    api = {e.key: e.count for e in prof.key_averages() if e.key in ("cudaGraphLaunch", "cudaLaunchKernel", "cudaMalloc")}
    return {"wall_ms_per_step": start.elapsed_time(end) / steps, "gpu_us_per_step_by_kind": kinds,
            "top_kernels_us_per_step": [(us, name[:60]) for us, _, name, _ in kernels[:12]], "cuda_api_calls": api}


def memory_over_requests(engine: LLMEngine, total: int = 1000, wave: int = 100) -> list[dict]:
    """Allocated / reserved MiB after every wave of short requests: flat means nothing leaks per request."""
    rows = []
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True)
    for done in range(wave, total + 1, wave):
        prompts = [list(range(100 + i % 50, 100 + i % 50 + 32 + i % 64)) for i in range(done - wave, done)]
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        rows.append({"requests": done, "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
                     "reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, for a first look")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: correctness,latency,throughput,hf,memory,kvint8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    out_len = 64 if args.quick else 256
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    results["triton"] = triton.__version__
    if "correctness" not in skip:
        results["correctness"] = check_correctness()
        print("correctness", results["correctness"], flush=True)
        results["quant_decode_logits_rel_err"] = quant_decode_logits_errors()
        print("quant decode logits", results["quant_decode_logits_rel_err"], flush=True)
    if "latency" not in skip:
        for name, quant in (("bf16", None), ("w8", W8), ("w4g128", W4), ("w8a8", W8A8), ("w8_head", W8_HEAD),
                            ("w4g128_head", W4_HEAD)):
            engine = engine_for(args.preset, quant, 8, 1024)
            r = run_bench(engine, "latency", 1, 512, out_len)
            results[f"latency_{name}"] = r.as_dict()
            print(name, f"decode {r.decode_tok_s:.1f} tok/s, ttft {r.ttft_p50_ms:.1f} ms", flush=True)
            if name == "bf16":
                compiled = compiled_triton_kernels()
                results["steady_decode_new_segments"] = steady_decode_segments(engine)
                results["steady_decode_triton_compiles"] = compiled_triton_kernels() - compiled
                results["decode_step_profile"] = decode_step_profile(engine)
                print("steady decode", results["steady_decode_new_segments"], "new segments,",
                      results["steady_decode_triton_compiles"], "compiles;", results["decode_step_profile"], flush=True)
                if "memory" not in skip:
                    results["memory_over_1000_requests"] = memory_over_requests(engine)
                    print("memory", results["memory_over_1000_requests"], flush=True)
            hf_spec = (engine.config, engine.device, engine.dtype)
            del engine
            free()
            if name == "bf16" and "hf" not in skip:  # after the engine is gone: both don't fit an H100 at once
                results["hf_latency_tok_s"] = hf_generate_tok_s(*hf_spec, 1, 512, 64)
                print("hf batch-1", results["hf_latency_tok_s"], flush=True)
    if "throughput" not in skip:
        n = 64 if args.quick else 256
        for name, quant in (("bf16", None), ("w8a8", W8A8)):
            engine = engine_for(args.preset, quant, 256, 1024)
            r = run_bench(engine, "throughput", n, 512, out_len)
            results[f"throughput_{name}"] = r.as_dict()
            print("throughput", name, f"{r.output_tok_s:.0f} out tok/s, {r.requests_s:.2f} req/s", flush=True)
            hf_spec = (engine.config, engine.device, engine.dtype)
            del engine
            free()
            if name == "bf16" and "hf" not in skip:
                results["hf_throughput_b16_tok_s"] = hf_generate_tok_s(*hf_spec, 16, 512, 64)
                print("hf batch-16", results["hf_throughput_b16_tok_s"], flush=True)
    if "kvint8" not in skip:
        results["kv_int8_logits_rel_err"] = kv_int8_logits_errors()
        print("kv int8 logits", results["kv_int8_logits_rel_err"], flush=True)
        results["kv_int8_throughput"] = kv_int8_throughput(args.preset, 64, 1024 if args.quick else 4096, out_len)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
