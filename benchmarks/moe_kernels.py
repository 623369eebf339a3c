"""MoE experts benchmark on CUDA (moe_triton.py) at Qwen3-30B-A3B shapes: H 2048, I 768, 128 experts, top-8.

python benchmarks/moe_kernels.py [--json FILE] [--tokens 64,256,1024,4096] [--formats bf16,w4g128,w8]
                                 [--configs-out FILE]

(a) routing: route_topk's Triton kernel against the torch ops it replaced, at 1 / 128 / 4096 tokens.
(b) decode: T = 1 on the gemv path for bf16, W4 g128 and W8 per channel: bytes = the 8 selected experts'
    gate_up + down weights (scales and zeros included), as GB/s and as a fraction of a measured device copy.
    Each timed call walks SETS disjoint expert sets, so the weights come from HBM, not L2. Each linear's
    configs (split along K too) are swept (SWEEP_DECODE) and the best kept for the rest of the run
    (--configs-out writes them).
(c) prefill: the grouped path at each --tokens count, bf16, against cuBLAS GEMMs of the same FLOPs (the
    [T*8, 2048] x [2048, 1536] gate_up and [T*8, 768] x [768, 2048] down as plain torch.matmul); ratios for
    the whole MoE call and for its two grouped launches alone, and the launches under each SWEEP_GROUPED config.
Where the checkout holds kernels/src/_moe_triton_old.py (the kernels before the tuning), it is timed too.
Every configuration is first checked against moe_experts_ref, also when replayed from a CUDA graph (the
Triton path must not sync with the host). Times are medians of CUDA-graph replays; weights are random
(random W4 / W8 codes and scales: timing does not depend on the values). Prints one JSON line.
"""

import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from lmconvert.kernels import moe_triton as mt
from lmconvert.kernels.activation import silu_mul
from lmconvert.kernels.moe import Experts, moe_experts_ref, route_topk, route_topk_ref

try:  # the kernels before issue #26's tuning, when the checkout has them (old vs new in one run)
    from lmconvert.kernels import _moe_triton_old as OLD
except ImportError:
    OLD = None

H, I, E, TOP_K = 2048, 768, 128, 8
SETS = E // TOP_K  # decode: disjoint expert sets walked per timed call (16 x the selected bytes >> L2)
DT = torch.bfloat16


def experts(N, K, fmt, num_experts=E):
    """Random experts [E, N, K] in fmt: "bf16", "fp32", "w4g<G>", "w8" (per channel) or "w8g<G>"."""
    if fmt in ("bf16", "fp32"):
        dtype = DT if fmt == "bf16" else torch.float32
        return Experts(16, K, weight=torch.randn(num_experts, N, K, device="cuda", dtype=dtype) / K ** 0.5)
    G = int(fmt[3:]) if "g" in fmt else K
    scales = torch.rand(num_experts, K // G, N, device="cuda", dtype=DT)
    if fmt.startswith("w4"):
        qweight = torch.randint(-2**31, 2**31 - 1, (num_experts, K // 8, N), device="cuda", dtype=torch.int32)
        zeros = torch.randint(6, 10, (num_experts, K // G, N), device="cuda").to(DT)
        return Experts(4, G, qweight=qweight, scales=scales / (4 * K ** 0.5), zeros=zeros)
    qweight = torch.randint(-127, 128, (num_experts, K, N), device="cuda", dtype=torch.int8)
    return Experts(8, G, qweight=qweight, scales=scales / (64 * K ** 0.5))


def expert_bytes(w: Experts) -> int:
    """One expert's bytes: weight or qweight, scales, zeros."""
    return sum(t[0].nbytes for t in w[2:] if t is not None)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn, rep=100):
    fn()  # compile outside the graph
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_gbps():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6


def routing(T):
    return route_topk(torch.randn(T, E, device="cuda"), TOP_K, renormalize=True)


def check_graph(x, gate_up, down, path):
    """moe_experts_triton captured in a CUDA graph once (capture fails on a host sync), then replayed with new
    inputs and routing copied in: the worst relative error against moe_experts_ref of 3 replays."""
    weights, ids = routing(x.shape[0])
    run = lambda: mt.moe_experts_triton(x, gate_up, down, weights, ids, path=path)  # noqa: E731
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    worst = 0.0
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        for dst, src in zip((weights, ids), routing(x.shape[0])):
            dst.copy_(src)
        g.replay()
        worst = max(worst, rel(out, moe_experts_ref(x, gate_up, down, weights, ids)))
    return worst


def check():
    """Both paths, every weight format, small shapes (ragged T, experts with no tokens) against moe_experts_ref:
    the worst relative error per case."""
    out = {}
    for fmt in ("fp32", "bf16", "w4g128", "w4g32", "w8", "w8g64"):
        dtype = torch.float32 if fmt == "fp32" else DT
        inter = 256 if "g128" in fmt else 192  # down's K: a whole number of groups
        gate_up, down = experts(2 * inter, 256, fmt, 16), experts(256, inter, fmt, 16)
        for T, k, path in ((1, 8, "gemv"), (3, 2, "gemv"), (3, 8, "grouped"), (77, 2, "grouped"),
                           (300, 8, "grouped")):
            x = torch.randn(T, 256, device="cuda", dtype=dtype)
            logits = torch.randn(T, 16, device="cuda")
            logits[:, :10] += 5.0  # experts 10..15 mostly idle
            weights, ids = route_topk(logits, k, renormalize=True)
            out[f"{fmt} T{T} k{k} {path}"] = rel(mt.moe_experts_triton(x, gate_up, down, weights, ids, path=path),
                                                 moe_experts_ref(x, gate_up, down, weights, ids))
    return out


# grouped configs swept per token count (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
SWEEP_GROUPED = [(16, 128, 64, 4, 3), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 128, 64, 4, 4),
                 (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
                 (128, 256, 64, 8, 3), (128, 128, 64, 4, 4)]
# decode configs swept per format and linear (BLOCK_N, BLOCK_K, warps, stages, programs along K)
SWEEP_DECODE = [(32, 128, 4, 3, 1), (16, 128, 4, 3, 1), (32, 128, 2, 3, 1), (64, 128, 4, 3, 1),
                (32, 128, 4, 3, 2), (32, 128, 4, 3, 4), (64, 128, 4, 3, 2), (64, 128, 4, 3, 4), (64, 128, 4, 3, 8),
                (64, 128, 8, 3, 4), (128, 128, 4, 3, 3), (128, 128, 8, 3, 4), (128, 128, 8, 2, 8),
                (64, 64, 4, 3, 8), (32, 128, 2, 3, 4), (256, 128, 8, 3, 3)]


def grouped_gemms(x, gate_up, down, ids, weights, cfg):
    """The two grouped launches (silu between them untimed) for one config."""
    n = x.shape[0] * TOP_K
    sorted_pairs, block_expert = mt.align_pairs(ids, E, cfg.block_m)
    route_w = weights.reshape(-1).float()
    sums = torch.zeros(x.shape[0], H, device="cuda")
    act = silu_mul(mt._grouped_linear(x, gate_up, sorted_pairs, block_expert, n, TOP_K, cfg))
    return lambda: (mt._grouped_linear(x, gate_up, sorted_pairs, block_expert, n, TOP_K, cfg),
                    mt._grouped_linear(act, down, sorted_pairs, block_expert, n, TOP_K, cfg, route_w, sums))


def prefill(T, gate_up, down, sweep=True):
    x = torch.randn(T, H, device="cuda", dtype=DT)
    weights, ids = routing(T)
    err = rel(mt.moe_experts_triton(x, gate_up, down, weights, ids, path="grouped"),
              moe_experts_ref(x, gate_up, down, weights, ids))
    graph_err = check_graph(x.clone(), gate_up, down, "grouped")
    moe_ms = bench(lambda: mt.moe_experts_triton(x, gate_up, down, weights, ids, path="grouped"))
    n = T * TOP_K
    cfg = mt.grouped_config(n, E)
    gemm_ms = bench(grouped_gemms(x, gate_up, down, ids, weights, cfg))
    swept = {}
    for c in SWEEP_GROUPED if sweep else ():
        if c[0] > 2 * n / E and c[0] > 16:  # far more padding than pairs
            continue
        try:
            swept[str(c)] = bench(grouped_gemms(x, gate_up, down, ids, weights, mt.GroupedConfig(*c)))
        except Exception as exc:  # out of shared memory
            swept[str(c)] = repr(exc)[:80]
    old_ms = None
    if OLD is not None:
        old_ms = bench(lambda: OLD.moe_experts_triton(x, gate_up, down, weights, ids, path="grouped"))
    a1, b1 = torch.randn(n, H, device="cuda", dtype=DT), torch.randn(H, 2 * I, device="cuda", dtype=DT)
    a2, b2 = torch.randn(n, I, device="cuda", dtype=DT), torch.randn(I, H, device="cuda", dtype=DT)
    dense_ms = bench(lambda: (torch.matmul(a1, b1), torch.matmul(a2, b2)))
    tflop = 2 * n * (H * 2 * I + I * H) / 1e12
    best = min((v, k) for k, v in swept.items() if isinstance(v, float)) if swept else (gemm_ms, str(tuple(cfg)))
    return {"tokens": T, "config": tuple(cfg), "rel_err": err, "graph_rel_err": graph_err, "moe_ms": moe_ms,
            "old_moe_ms": old_ms, "grouped_gemms_ms": gemm_ms, "dense_cublas_ms": dense_ms,
            "gemms_vs_cublas": gemm_ms / dense_ms, "moe_vs_cublas": moe_ms / dense_ms,
            "grouped_tflops": tflop / gemm_ms * 1e3, "cublas_tflops": tflop / dense_ms * 1e3,
            "best_swept": best, "swept_ms": swept}


def decode(fmt, copy):
    gate_up, down = experts(2 * I, H, fmt), experts(H, I, fmt)
    xs = [torch.randn(1, H, device="cuda", dtype=DT) for _ in range(SETS)]
    weights = [torch.softmax(torch.randn(1, TOP_K, device="cuda"), -1) for _ in range(SETS)]
    perm = torch.randperm(E, device="cuda")
    ids = [perm[i * TOP_K:(i + 1) * TOP_K].view(1, TOP_K).clone() for i in range(SETS)]  # disjoint sets
    flat = [i.view(-1) for i in ids]
    route_w = [w.view(-1).float() for w in weights]
    acts = [mt._decode_linear(x, gate_up, f, TOP_K, TOP_K) for x, f in zip(xs, flat)]
    sums = torch.zeros(1, H, device="cuda")
    nbytes_gu, nbytes_dn = TOP_K * expert_bytes(gate_up), TOP_K * expert_bytes(down)

    def time_gu(cfg):
        return bench(lambda: [mt._decode_linear(x, gate_up, f, TOP_K, TOP_K, cfg=cfg) for x, f in zip(xs, flat)]) / SETS

    def time_dn(cfg):
        return bench(lambda: [mt._decode_linear(a, down, f, TOP_K, TOP_K, w, sums, cfg=cfg)
                              for a, f, w in zip(acts, flat, route_w)]) / SETS

    swept = {}
    for name, timer, key in (("gate_up", time_gu, (gate_up.bits, True)), ("down", time_dn, (down.bits, False))):
        res = {}
        for c in SWEEP_DECODE:
            try:
                res[str(c)] = timer(mt.DecodeConfig(*c)) * 1e3
            except Exception as exc:
                res[str(c)] = repr(exc)[:80]
        ok = {k: v for k, v in res.items() if isinstance(v, float)}
        best = min(ok, key=ok.get)
        mt.DECODE_CONFIGS[key] = mt.DecodeConfig(*eval(best))  # the rest of this process uses the best
        swept[name] = {"best": best, "us": res}
    if gate_up.bits != 16:  # the other rounding of the dequantized weights (rounded as the reference / exact fp32)
        default = mt.DECODE_ROUND_WEIGHTS
        mt.DECODE_ROUND_WEIGHTS = not default
        swept["rounded_us" if not default else "unrounded_us"] = {"gate_up": time_gu(None) * 1e3,
                                                                  "down": time_dn(None) * 1e3}
        mt.DECODE_ROUND_WEIGHTS = default
    err = max(rel(mt.moe_experts_triton(x, gate_up, down, w, i), moe_experts_ref(x, gate_up, down, w, i))
              for x, w, i in zip(xs, weights, ids))
    graph_err = check_graph(xs[0].clone(), gate_up, down, "gemv")
    ms = bench(lambda: [mt.moe_experts_triton(x, gate_up, down, w, i) for x, w, i in zip(xs, weights, ids)]) / SETS
    gemv_ms = bench(lambda: [(mt._decode_linear(x, gate_up, f, TOP_K, TOP_K),
                              mt._decode_linear(a, down, f, TOP_K, TOP_K, w, sums))
                             for x, a, f, w in zip(xs, acts, flat, route_w)]) / SETS
    nbytes = nbytes_gu + nbytes_dn
    gbps, gemv_gbps = nbytes / ms / 1e6, nbytes / gemv_ms / 1e6
    out = {"rel_err": err, "graph_rel_err": graph_err, "bytes": nbytes, "moe_us": ms * 1e3,
           "gemvs_us": gemv_ms * 1e3, "moe_gbps": gbps, "gemvs_gbps": gemv_gbps, "moe_frac_of_copy": gbps / copy,
           "gemvs_frac_of_copy": gemv_gbps / copy, "configs": {str(k): tuple(v) for k, v in mt.DECODE_CONFIGS.items()
                                                                if k[0] == gate_up.bits}, "swept": swept}
    if OLD is not None:
        old = bench(lambda: [OLD.moe_experts_triton(x, gate_up, down, w, i)
                             for x, w, i in zip(xs, weights, ids)]) / SETS
        out["old_moe_us"] = old * 1e3
        out["old_moe_frac_of_copy"] = nbytes / old / 1e6 / copy
    return out


def routing_times():
    """route_topk: the Triton kernel against the torch ops it replaces (old path), us a call."""
    out = {}
    for T in (1, 128, 4096):
        logits = torch.randn(T, E, device="cuda", dtype=DT)
        w, i = route_topk(logits, TOP_K, True)
        rw, ri = route_topk_ref(logits, TOP_K, True)
        probs = torch.softmax(logits.float(), -1)  # bf16 logits tie often; the order among ties is free
        out[f"T{T}"] = {"ids_equal": bool(torch.equal(i, ri)),
                        "same_probs_chosen": bool(torch.equal(probs.gather(1, i), probs.gather(1, ri))),
                        "max_w_diff": (w - rw).abs().max().item(),
                        "triton_us": bench(lambda: route_topk(logits, TOP_K, True)) * 1e3,
                        "torch_us": bench(lambda: route_topk_ref(logits, TOP_K, True)) * 1e3}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--tokens", default="64,256,1024,4096", help="prefill token counts (',' for none)")
    ap.add_argument("--formats", default="bf16,w4g128,w8", help="decode weight formats")
    ap.add_argument("--configs-out", help="write the best decode and grouped configs here (moe_gpu.py --configs)")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy = copy_gbps()
    checks = check()
    out = {"device": torch.cuda.get_device_name(), "shape": {"H": H, "I": I, "E": E, "top_k": TOP_K},
           "worst_check": max(checks.values()), "checks": checks, "copy_gbps": copy, "routing": routing_times()}
    print(json.dumps(out["routing"]), flush=True)
    for fmt in filter(None, args.formats.split(",")):
        out[f"decode_{fmt}"] = decode(fmt, copy)
        print(fmt, json.dumps(out[f"decode_{fmt}"]), flush=True)
    gate_up, down = experts(2 * I, H, "bf16"), experts(H, I, "bf16")
    for T in map(int, filter(None, args.tokens.split(","))):
        out[f"prefill_bf16_T{T}"] = prefill(T, gate_up, down)
        print(T, json.dumps(out[f"prefill_bf16_T{T}"]), flush=True)
    line = json.dumps(out)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    if args.configs_out:
        with open(args.configs_out, "w") as f:
            json.dump({"decode": [[list(k), list(v)] for k, v in mt.DECODE_CONFIGS.items()]}, f)


if __name__ == "__main__":
    main()
