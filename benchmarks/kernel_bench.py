"""Kernel benchmark on CUDA: correctness vs the torch references first, then timings.

python benchmarks/kernel_bench.py [--json FILE] [--quick] [--attention | --w8a8 | --decode | --linears]
Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), so launch gaps stay out;
each replay walks several weight copies so that the weights come from HBM, not L2.
`--w8a8`: only the W8A8 rows (int8 GEMM vs cuBLAS bf16). `TRITON_INTERPRET=1 python benchmarks/kernel_bench.py
--w8a8 --smoke` walks the same W8A8 code on the CPU on a tiny shape (timings meaningless).
"""

import argparse
import json
import math
import time

import torch
import triton
from triton.testing import do_bench_cudagraph

from lmconvert.kernels import int8_linear as il
from lmconvert.kernels import quant_linear as ql
from lmconvert.kernels.autotune import Autotuner
from lmconvert.kernels import activation, kv_cache, norm, paged_attention_ref, paged_attention_triton, rope  # noqa: I001
from lmconvert.quant.primitives import quantize_w4, quantize_w8

SHAPES = [(4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096)]  # Qwen3-8B K -> N
# --gemv-sweep: (BN, BB, warps, stages) at 1-4 blocks a program (session 9: the sweep that found the 1-warp,
# 2-4 block programs now in quant_linear.GEMV_CONFIGS)
GEMV_SWEEP = ((32, 1, 1, 0), (64, 1, 1, 0), (128, 1, 2, 0), (32, 2, 1, 0), (64, 2, 2, 0), (64, 1, 1, 2), (64, 1, 1, 3),
              (16, 1, 1, 0))
SWAPPED_SWEEP = ((32, 2), (64, 1), (64, 2), (128, 1), (128, 2), (128, 4), (256, 2), (256, 4))  # --wide: (BN, warps)
L2_BYTES = 50 << 20


def bench(fn_per_set, n_sets):
    """Median ms of one call, each graph replay running all n_sets weight copies."""
    def run_all():
        for i in range(n_sets):
            fn_per_set(i)
    run_all()  # autotune / compile outside the graph
    torch.cuda.synchronize()
    return do_bench_cudagraph(run_all, rep=200, return_mode="median") / n_sets


def copy_gbps():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), 1)
    return 2 * src.numel() / ms / 1e6


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quant4(w, G, dtype=torch.bfloat16):  # quantize on the CPU: the primitives are the contract, not a GPU path
    qw, s, z = (t.cuda() for t in quantize_w4(w.cpu(), G, dtype=dtype))
    return ql.prepare_w4(qw, s, z, G)


def quant8(w, G):
    qw, s = (t.contiguous().cuda() for t in quantize_w8(w.cpu(), G, dtype=torch.bfloat16))
    return ql.prepare_w8(qw, s, G)


BAD = set()  # (key, cfg) that failed on the GPU: never offered to the autotuner


def _poison(M, N, dtype):
    """Fill the allocator block the next torch.empty(M, N) is likely to get with NaN (unwritten -> caught)."""
    torch.full((M, N), float("nan"), device="cuda", dtype=dtype)


def check_linears(decode=False):
    """Every candidate config of every design vs the torch reference, fresh inputs each; twice (the split-K
    workspace must come back clean); then a CUDA graph replayed 3 times with new inputs copied in."""
    out = {}
    cases = ((32, 768, torch.bfloat16), (64, 1536, torch.bfloat16), (128, 3072, torch.bfloat16),
             (128, 3072, torch.float16), (64, 576, torch.bfloat16))
    for M in (1, 16) if decode else (1, 3, 16, 33, 64, 300):
        for G, K, dtype in cases[2:] + cases[:1] if decode else cases:
            N = 480
            for bits in (4, 8):
                if bits == 8 and dtype == torch.float16:
                    continue
                w = torch.randn(N, K)
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                bias = torch.randn(N, device="cuda", dtype=dtype)
                if bits == 4:
                    qw, s, z = quant4(w, G, dtype)
                    ref = ql.w4a16_linear_ref(x, qw, s, z, G, bias)
                else:
                    (qw, s), z = quant8(w, G), None
                    ref = ql.w8a16_linear_ref(x, qw, s, G, bias)
                key, cands, run = ql.plan(x, qw, s, z, bias, G, bits)
                worst = 0.0
                for cfg in cands:
                    try:
                        for _ in range(2):
                            _poison(M, N, dtype)
                            y = run(cfg)
                            e = rel(y, ref)
                            if not (torch.isfinite(y.float()).all() and e < 1e-2):
                                raise ValueError(f"rel err {e:.2e}")
                            worst = max(worst, e)
                    except Exception as exc:  # noqa: BLE001
                        print("FAIL", key[:5], cfg, repr(exc)[:200])
                        BAD.add((key[0], key[3], key[4], key[5], cfg))
                out[f"w{bits} M{M} G{G} K{K} {str(dtype)[6:]} ({len(cands)} cfgs)"] = worst
    K, N, G = 4096, 6144, 128
    qw, s, z = quant4(torch.randn(N, K), G)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ql.w4a16_linear(x, qw, s, z, G)  # tune + compile outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ql.w4a16_linear(x, qw, s, z, G)
    worst = 0.0
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        worst = max(worst, rel(y, ql.w4a16_linear_ref(x, qw, s, z, G)))
    out[f"w4 graph replays M1 cfg {ql._tuner.chosen[next(k for k in ql._tuner.chosen if k[1] == N)]}"] = worst
    return out


def check_store_kv_int8():
    """Triton store vs the torch reference: 0 when (scale, zero) are equal and codes at most one apart (GPU fp32
    division may round a tie the other way); else the excess."""
    T, KVH, D, bs = 300, 8, 128, 16
    k, v = (torch.randn(T, KVH, D, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(2))
    slots = torch.randperm(64 * bs, device="cuda")[:T]
    shapes = ((D, torch.int8), (D, torch.int8), (2, torch.float16), (2, torch.float16))
    pools = [[torch.zeros(64, bs, KVH, n, device="cuda", dtype=t) for n, t in shapes] for _ in range(2)]
    kv_cache.store_kv_triton(k, v, *pools[0][:2], slots, *pools[0][2:])
    kv_cache.store_kv_ref(k, v, *pools[1][:2], slots, *pools[1][2:])
    codes = max((a.float() - b.float()).abs().max().item() for a, b in zip(pools[0][:2], pools[1][:2]))
    scales = max((a.float() - b.float()).abs().max().item() for a, b in zip(pools[0][2:], pools[1][2:]))
    return max(0.0, codes - 1) + scales


def check_correctness(linears_only=False, decode=False, attention_only=False):
    dev, bf = "cuda", torch.bfloat16
    tuner, ql._tuner = ql._tuner, Autotuner(timing=False)
    out = {} if attention_only else check_linears(decode)
    if linears_only:
        ql._tuner = tuner
        return out
    for bs, KVH, window, q_lens in ((16, 8, None, [1] * 5), (32, 4, 100, [1] * 5), (64, 1, None, [1] * 5),
                                     (16, 8, None, [1, 40, 7, 300, 1]), (32, 4, 64, [1, 40, 7, 300, 1])):
        ctxs = [700, 40, 1500, 300, 2049]
        H, D = 32, 128
        nb = [-(-c // bs) for c in ctxs]
        kc = torch.randn(sum(nb) + 1, bs, KVH, D, device=dev, dtype=bf)
        vc = torch.randn_like(kc)
        perm = torch.randperm(kc.shape[0], device=dev).int()
        bt = torch.zeros(len(ctxs), max(nb), dtype=torch.int32, device=dev)
        at = 0
        for i, n in enumerate(nb):
            bt[i, :n] = perm[at:at + n]
            at += n
        cu = torch.tensor([0] + q_lens, device=dev).cumsum(0).int()
        ctx = torch.tensor(ctxs, device=dev, dtype=torch.int32)
        q = torch.randn(int(cu[-1]), H, D, device=dev, dtype=bf)
        args = (q, kc, vc, bt, cu, ctx, 1 / math.sqrt(D), window)
        ref = paged_attention_ref.paged_attention_ref(*args)
        out[f"attn bs{bs} kvh{KVH} win{window} q{max(q_lens)}"] = rel(paged_attention_triton.paged_attention_triton(*args), ref)
        (kq, ks), (vq, vs) = kv_cache.quantize_kv_ref(kc), kv_cache.quantize_kv_ref(vc)
        args8 = (q, kq, vq, bt, cu, ctx, 1 / math.sqrt(D), window)
        ref8 = paged_attention_ref.paged_attention_ref(*args8, ks, vs)
        out[f"attn int8 bs{bs} kvh{KVH} win{window} q{max(q_lens)}"] = rel(
            paged_attention_triton.paged_attention_triton(*args8, k_scales=ks, v_scales=vs), ref8)
        out[f"attn int8 vs bf16 KV bs{bs} q{max(q_lens)} (quantization)"] = rel(ref8, ref)
        if max(q_lens) == 1:
            out[f"attn split8 bs{bs}"] = rel(paged_attention_triton.paged_attention_triton(*args, num_splits=8), ref)
            out[f"attn int8 split8 bs{bs}"] = rel(paged_attention_triton.paged_attention_triton(
                *args8, num_splits=8, k_scales=ks, v_scales=vs), ref8)
    out["store_kv int8 (0: codes within 1, scales equal)"] = check_store_kv_int8()
    x, r, w = (torch.randn(n, device=dev, dtype=bf) for n in ((64, 4096), (64, 4096), (4096,)))
    o1, r1 = norm.rms_norm_triton(x, w, 1e-6, r)
    o2, r2 = norm.rms_norm_ref(x, w, 1e-6, r)
    out["rms_norm bitwise"] = float(torch.equal(o1, o2) and torch.equal(r1, r2))
    g = torch.randn(64, 2 * 12288, device=dev, dtype=bf)
    out["silu_mul"] = rel(activation.silu_mul_triton(g), activation.silu_mul_ref(g))
    cache = rope.build_rope_cache(128, 4096, 1e6, None, dev)
    qq, kk = torch.randn(64, 32, 128, device=dev, dtype=bf), torch.randn(64, 8, 128, device=dev, dtype=bf)
    pos = torch.randint(0, 4096, (64,), device=dev)
    a, b = rope.apply_rope_triton(qq, kk, pos, cache), rope.apply_rope_ref(qq, kk, pos, cache)
    out["rope"] = max(rel(a[0], b[0]), rel(a[1], b[1]))
    ql._tuner = tuner
    return out


def tune(x, weights, bits, defer=False):
    """Pick the config as the runtime does: the linears' tuner, timing over cold copies of the weights in the
    mode the call runs in. An earlier pick for the same key (check_linears) is dropped first, so this one is
    timed with the candidate list in force (--wide, --gemv-sweep)."""
    key = ql.plan(x, weights[0], weights[1], weights[2] if bits == 4 else None, None, 128, bits)[0]
    ql._tuner.chosen.pop((*key, defer), None)
    (ql.w4a16_linear_triton if bits == 4 else ql.w8a16_linear_triton)(x, *weights, 128, defer=defer)
    if defer:
        ql.clear_workspace(x.device)  # this call's own sums: nothing takes them


def bench_linears(copy_bw, quick, decode=False):
    rows = []
    for K, N in SHAPES[:1] if quick else SHAPES:
        w = torch.randn(N, K)
        qw, s, z = quant4(w, 128)
        q8, s8 = quant8(w, 128)
        wb = w.t().contiguous().to(torch.bfloat16).cuda()
        del w
        sets = {name: max(2, math.ceil(2 * L2_BYTES / nbytes)) for name, nbytes in
                (("bf16", wb.nbytes), ("w4", qw.nbytes + 2 * s.nbytes), ("w8", q8.nbytes + s8.nbytes))}
        wbs = [wb] + [wb.clone() for _ in range(sets["bf16"] - 1)]
        w4s = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(sets["w4"] - 1)]
        w8s = [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(sets["w8"] - 1)]
        for M in (1, 16) if decode else (1, 16, 64, 2048):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_bf = bench(lambda i: x @ wbs[i], len(wbs))
            if decode:
                for defer in (False, True):
                    tune(x, w4s[0], 4, defer)
                    tune(x, w8s[0], 8, defer)
            t_w4 = bench(lambda i: ql.w4a16_linear_triton(x, *w4s[i], 128), len(w4s))
            w4_bytes = qw.nbytes + 2 * s.nbytes + x.nbytes + M * N * 2
            row = dict(kernel="w4a16", M=M, K=K, N=N, us=t_w4 * 1e3, cublas_us=t_bf * 1e3, speedup=t_bf / t_w4,
                       gbps=w4_bytes / t_w4 / 1e6, pct_copy=100 * w4_bytes / t_w4 / 1e6 / copy_bw)
            rows.append(row)
            if M in (1, 16, 2048):
                t_w8 = bench(lambda i: ql.w8a16_linear_triton(x, *w8s[i], 128), len(w8s))
                w8_bytes = q8.nbytes + s8.nbytes + x.nbytes + M * N * 2
                rows.append(dict(kernel="w8a16", M=M, K=K, N=N, us=t_w8 * 1e3, cublas_us=t_bf * 1e3,
                                 speedup=t_bf / t_w8, gbps=w8_bytes / t_w8 / 1e6,
                                 pct_copy=100 * w8_bytes / t_w8 / 1e6 / copy_bw))
            if decode:  # as the runtime runs its linears: the next kernel finishes the split-K sums
                for name, fn, ws_set, nbytes in (("w4a16 deferred", ql.w4a16_linear_triton, w4s, w4_bytes),
                                                  ("w8a16 deferred", ql.w8a16_linear_triton, w8s, w8_bytes)):
                    t = bench(lambda i: fn(x, *ws_set[i], 128, defer=True), len(ws_set))
                    ql.clear_workspace(x.device)  # nothing consumed the sums: clean up for the next launches
                    rows.append(dict(kernel=name, M=M, K=K, N=N, us=t * 1e3, cublas_us=t_bf * 1e3, speedup=t_bf / t,
                                     gbps=nbytes / t / 1e6, pct_copy=100 * nbytes / t / 1e6 / copy_bw))
            for r in rows[-4 if decode else -2:]:  # as they come: a run cut short still reports
                print("row", {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        del wbs, w4s, w8s
    return rows


# ---- W8A8: int8 x int8 -> int32 GEMM with the per-token x per-channel epilogue ------------------------

def quant_w8a8(w, device):
    qw, s = quantize_w8(w.cpu(), None, dtype=torch.bfloat16)
    return il.prepare_w8a8(qw.contiguous().to(device), s.to(device))


def check_w8a8(device, shapes):
    """Every int8 GEMM candidate vs the exact torch reference on the same codes, fp32 output (the same fp32
    epilogue both sides: equal but for an FMA contraction of the bias add), and the Triton quantizer's codes vs the reference's
    (the GPU's fp32 division may move a code at a rounding tie by one)."""
    out = {}
    tuner, il._tuner = il._tuner, Autotuner(timing=False)
    for K, N in shapes:
        w8 = quant_w8a8(torch.randn(N, K), device)
        for M in (1, 3, 16, 33, 300):
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            q, a_scale = il.quantize_per_token_ref(x)
            q_t, a_scale_t = il.quantize_per_token_triton(x)
            diff = (q_t.int() - q.int()).abs()
            out[f"w8a8 quant M{M} K{K} (max code diff, share moved)"] = (diff.max().item(), diff.bool().float().mean().item())
            bias = torch.randn(N, device=device, dtype=torch.bfloat16)
            ref = il.int8_gemm_ref(q, a_scale, *w8, bias, torch.float32)
            _, cands, run = il.plan(q, a_scale, *w8, bias, torch.float32)
            worst = 0.0
            for cfg in cands:
                try:
                    y = run(cfg)
                    e = rel(y, ref)
                    if not (torch.isfinite(y).all() and e < 1e-6):
                        raise ValueError(f"rel err {e:.2e}")
                    worst = max(worst, e)
                except Exception as exc:  # noqa: BLE001
                    print("FAIL w8a8", M, K, N, cfg, repr(exc)[:200])
                    worst = float("inf")
            out[f"w8a8 gemm M{M} K{K} N{N} ({len(cands)} cfgs)"] = worst
    il._tuner = tuner
    return out


def bench_w8a8(shapes, ms, device, timer):
    """Rows: the int8 GEMM alone (x already quantized) and the whole W8A8 linear (quantize x + GEMM), vs
    cuBLAS bf16 x @ W; TFLOP/s = 2 M N K / time."""
    rows = []
    for K, N in shapes:
        w = torch.randn(N, K)
        wb = w.t().contiguous().to(device=device, dtype=torch.bfloat16)
        w8 = quant_w8a8(w, device)
        n_sets = max(2, math.ceil(2 * L2_BYTES / wb.nbytes)) if device == "cuda" else 1
        wbs = [wb] + [wb.clone() for _ in range(n_sets - 1)]
        w8s = [w8] + [tuple(t.clone() for t in w8) for _ in range((n_sets + 1) // 2 - 1)]  # clone keeps the strides
        del w
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            q, a_scale = il.quantize_per_token(x)
            t_bf = timer(lambda i: x @ wbs[i], len(wbs))
            t_gemm = timer(lambda i: il.int8_gemm_triton(q, a_scale, *w8s[i], None, torch.bfloat16), len(w8s))
            t_lin = timer(lambda i: il.w8a8_linear_triton(x, *w8s[i]), len(w8s))
            flop = 2 * M * N * K
            nbytes = w8[0].nbytes + w8[1].nbytes + M * K + M * N * 2
            for kernel, t in (("int8_gemm", t_gemm), ("w8a8_linear", t_lin)):
                rows.append(dict(kernel=kernel, M=M, K=K, N=N, us=t * 1e3, cublas_us=t_bf * 1e3, speedup=t_bf / t,
                                 tflops=flop / t / 1e9, cublas_tflops=flop / t_bf / 1e9, gbps=nbytes / t / 1e6))
                print("row", {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        del wbs, w8s
    return rows


def wall_ms(fn_per_set, n_sets):
    """CPU smoke timer: one call each, wall clock (the interpreter's times mean nothing)."""
    start = time.perf_counter()
    for i in range(n_sets):
        fn_per_set(i)
    return (time.perf_counter() - start) * 1e3 / n_sets


def smoke_w8a8():
    """The W8A8 check and bench code on CPU tensors under TRITON_INTERPRET=1, one tiny shape."""
    shapes = [(64, 48)]
    for name, e in check_w8a8("cpu", shapes).items():
        print(f"check {name:50s} {e}")
    bench_w8a8(shapes, (1, 16, 33), "cpu", wall_ms)


def bench_decode_attention(copy_bw, sweep_int8=False):
    """Paged decode attention at Qwen3-8B shapes, bf16 KV and int8 KV (same data, quantized), per block size."""
    S, ctx_len, H, KVH, D = 64, 4096, 32, 8, 128
    rows = []
    q = torch.randn(S, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(S, KVH, ctx_len, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    t_sdpa = bench(lambda i: torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, scale=D**-0.5, enable_gqa=True), 1)
    cu = torch.arange(S + 1, device="cuda", dtype=torch.int32)
    ctx = torch.full((S,), ctx_len, device="cuda", dtype=torch.int32)
    for bs in (16, 32, 64):
        nb = ctx_len // bs
        bt = torch.randperm(S * nb, device="cuda").int().view(S, nb)
        kc = torch.empty(S * nb, bs, KVH, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.empty_like(kc)
        kc[bt.long()] = k.view(S, KVH, nb, bs, D).permute(0, 2, 3, 1, 4)  # same data, paged and scattered
        vc[bt.long()] = v.view(S, KVH, nb, bs, D).permute(0, 2, 3, 1, 4)
        t = bench(lambda i: paged_attention_triton.paged_attention_triton(q, kc, vc, bt, cu, ctx, D**-0.5), 1)
        kv_bytes = kc.nbytes + vc.nbytes
        rows.append(dict(kernel=f"paged_decode bs{bs} k{paged_attention_triton.decode_tile(bs)}", us=t * 1e3,
                         sdpa_us=t_sdpa * 1e3, speedup=t_sdpa / t,
                         gbps=kv_bytes / t / 1e6, pct_copy=100 * kv_bytes / t / 1e6 / copy_bw, mb=kv_bytes / 1e6))
        (kq, ks), (vq, vs) = kv_cache.quantize_kv_ref(kc), kv_cache.quantize_kv_ref(vc)
        del kc, vc
        kv8_bytes = kq.nbytes + vq.nbytes + ks.nbytes + vs.nbytes
        default = (None, None, None, True)  # decode_tile keys, decode_launch warps / stages, the word kernel
        # keys per step, warps, stages, word or byte kernel: the default, then a sweep of the word kernel (block
        # size 16 only; the byte kernel lost every point of session 3's sweep)
        sweep = [default] + ([(k, w, st, True) for k in (32, 64, 128) for w in (2, 4, 8) for st in (2, 3)]
                              if bs == 16 and sweep_int8 else [])
        for keys, warps, stages, words in sweep:
            try:
                t8 = bench(lambda i: paged_attention_triton.paged_attention_triton(
                    q, kq, vq, bt, cu, ctx, D**-0.5, k_scales=ks, v_scales=vs, decode_keys=keys, decode_warps=warps,
                    decode_stages=stages, decode_words=words), 1)
            except Exception as exc:  # noqa: BLE001  (a sweep point out of resources)
                print("skip", keys, warps, stages, words, repr(exc)[:100])
                continue
            kind = "words" if words else "bytes"
            rows.append(dict(kernel=f"paged_decode int8 {kind} bs{bs} k{keys} w{warps} st{stages}", us=t8 * 1e3,
                             sdpa_us=t_sdpa * 1e3, speedup=t_sdpa / t8, gbps=kv8_bytes / t8 / 1e6, mb=kv8_bytes / 1e6,
                             vs_bf16_kv=t / t8, pct_copy=100 * kv8_bytes / t8 / 1e6 / copy_bw))
            print("row", {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        del kq, vq, ks, vs
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--linears", action="store_true", help="only the quantized linears")
    ap.add_argument("--wide", action="store_true", help="tune over a wider candidate list (to trim the default)")
    ap.add_argument("--gemv-sweep", action="store_true",
                    help="M = 1: also tune the gemv over GEMV_SWEEP (short programs: 1-4 blocks)")
    ap.add_argument("--decode", action="store_true", help="linears at M = 1 and 16 only")
    ap.add_argument("--attention", action="store_true", help="only paged attention and store_kv (bf16 and int8 KV)")
    ap.add_argument("--attention-sweep", action="store_true", help="with --attention: sweep the int8-KV decode launch")
    ap.add_argument("--w8a8", action="store_true", help="only the W8A8 int8 GEMM rows (M = 1, 16, 2048)")
    ap.add_argument("--smoke", action="store_true", help="with --w8a8 under TRITON_INTERPRET=1: CPU code-path check")
    args = ap.parse_args()
    if args.smoke:
        return smoke_w8a8()
    plain = ql.candidates

    def offered(M, N, K, R, device, whole=False, bits=4):  # drop what failed its check
        c = plain(M, N, K, R, device, whole, bits)
        return [f for f in c if not any(b[-1] == f and b[0] == ql.block_m(M) for b in BAD)]
    ql.candidates = offered
    args.linears |= args.decode
    if args.wide:
        narrow = ql.candidates

        def wide(M, N, K, R, device, whole=False, bits=4):
            c = narrow(M, N, K, R, device, whole, bits)
            fused = [f for f in c if f[0] == "fused"]
            extra = [(*f[:3], w, st, f[5]) for f in fused for w, st in ((4, 1), (4, 3), (8, 2)) if M == 1]
            extra += [("fused", 256, p, 8, 2, True) for p in (2, 4) if fused and M > 1]
            if any(f[0] == "swapped" for f in c):  # the session-8 sweep of the swapped design
                sweep = [("swapped", bn, per, w, st) for bn, w in SWAPPED_SWEEP for per in (2, 4, 8, 16)
                         for st in (2, 3, 4)]
                extra += [cfg for cfg in sweep if cfg not in c]
            return c + extra + [("dequant", 256)] * any(f[0] == "dequant" for f in c)
        ql.candidates = wide
    if args.gemv_sweep:
        listed = ql.candidates

        def gemv_sweep(M, N, K, R, device, whole=False, bits=4):
            c = listed(M, N, K, R, device, whole, bits)
            extra = [("gemv", bn, bb, per, w, st) for bn, bb, w, st in GEMV_SWEEP for per in (1, 2, 3, 4) if bb <= per]
            return c + [cfg for cfg in extra if cfg not in c] if any(f[0] == "gemv" for f in c) else c
        ql.candidates = gemv_sweep
    torch.manual_seed(0)
    errs = {} if args.w8a8 else check_correctness(args.linears, args.decode, args.attention)
    with_w8a8 = args.w8a8 or not (args.decode or args.attention)
    errs.update(check_w8a8("cuda", SHAPES[:1] if args.quick else SHAPES) if with_w8a8 else {})
    for name, e in errs.items():
        bad = e[0] > 1 if isinstance(e, tuple) else e > 1e-2 and "quantization" not in name
        print(f"check {name:50s} {e if isinstance(e, tuple) else f'{e:.2e}'}" + ("  FAIL" if bad else ""))
    copy_bw = copy_gbps()
    rows = []
    sections = [] if args.w8a8 or args.attention else [lambda: bench_linears(copy_bw, args.quick, args.decode)]
    if with_w8a8:
        sections.append(lambda: bench_w8a8(SHAPES[:1] if args.quick else SHAPES, (1, 16, 2048), "cuda", bench))
    if not args.linears and not args.w8a8:
        sections.append(lambda: bench_decode_attention(copy_bw, args.attention_sweep))
    for section in sections:
        try:  # one failing section still leaves the other's numbers
            rows += section()
        except Exception as e:  # noqa: BLE001
            print("section failed:", repr(e))
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy {copy_bw:.0f} GB/s")
    print(f"{'kernel':44s} {'M':>5s} {'K':>6s} {'N':>6s} {'us':>9s} {'base us':>9s} {'x base':>7s} {'GB/s':>7s} "
          f"{'%copy':>6s} {'KV MB':>7s} {'x bf16 KV':>9s}")
    for r in rows:
        if "tflops" in r:
            print(f"{r['kernel']:44s} {r['M']:>5} {r['K']:>6} {r['N']:>6} {r['us']:9.1f} {r['cublas_us']:9.1f} "
                  f"{r['speedup']:7.2f} {r['gbps']:7.0f}   {r['tflops']:.0f} TFLOP/s (cuBLAS {r['cublas_tflops']:.0f})")
            continue
        kv_mb = f"{r['mb']:7.0f}" if "mb" in r else f"{'':7s}"
        vs_bf16 = f"{r['vs_bf16_kv']:9.2f}" if "vs_bf16_kv" in r else ""
        print(f"{r['kernel']:44s} {r.get('M', ''):>5} {r.get('K', ''):>6} {r.get('N', ''):>6} {r['us']:9.1f} "
              f"{r.get('cublas_us', r.get('sdpa_us')):9.1f} {r['speedup']:7.2f} {r['gbps']:7.0f} {r['pct_copy']:6.1f} "
              f"{kv_mb} {vs_bf16}")
    for key, times in {**ql._tuner.times, **il._tuner.times}.items():  # every candidate's time, to trim the lists
        best = min(times.values())
        mode = "deferred" if key[-1] is True else ""
        print("tune", key[:5], mode, " ".join(f"{c}:{t * 1e3:.1f}{'*' if t == best else ''}" for c, t in times.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           copy_gbps=copy_bw, checks=errs, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
