"""MoE experts: Triton (interpreted) vs moe_experts_ref vs an fp64 loop over dequantized weights.

Both Triton paths are forced explicitly (gemv: one program per pair; grouped: pairs sorted into per-expert
blocks). Tolerances (relative Frobenius error): fp32 1e-5 (same products, another summation order); bf16
1e-2: the kernels round h, the activations, the dequantized weights and each pair's output to bf16 where
the reference does, so a different summation order only flips a rounding here and there (interpreted, with
bf16 rounded by hand as on the GPU, they measure 0); a wrong expert, row, group or zero point costs > 0.1.
"""

import pytest
import torch

from lmconvert.kernels import moe_triton as mt
from lmconvert.kernels.moe import Experts, moe_experts_ref, route_topk, route_topk_ref
from lmconvert.kernels.pending import PendingSum, take
from lmconvert.quant.primitives import dequantize_w4, dequantize_w8, quantize_w4, quantize_w8

from kernel_testing import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _experts(w: torch.Tensor, fmt: str, dtype) -> Experts:
    """w [E, N, K] fp32 -> Experts in fmt: "fp", "w4g<G>", "w8" (per channel) or "w8g<G>"."""
    K = w.shape[2]
    if fmt == "fp":
        return Experts(16, K, weight=w.to(dtype))
    G = int(fmt[3:]) if "g" in fmt else K
    if fmt.startswith("w4"):
        qw, s, z = zip(*(quantize_w4(we, G, dtype=dtype) for we in w))
        return Experts(4, G, qweight=torch.stack(qw), scales=torch.stack(s), zeros=torch.stack(z))
    qw, s = zip(*(quantize_w8(we, G, dtype=dtype) for we in w))
    return Experts(8, G, qweight=torch.stack(qw), scales=torch.stack(s))


def _layer(E, H, I, fmt, dtype):
    gate_up = _experts(torch.randn(E, 2 * I, H) / H ** 0.5, fmt, dtype)
    down = _experts(torch.randn(E, H, I) / I ** 0.5, fmt, dtype)
    return gate_up, down


def _routing(T, E, k, hot=None):
    """route_topk of random logits; hot: only experts 0..hot-1 are ever chosen (the rest get no tokens)."""
    logits = torch.randn(T, E)
    if hot is not None:
        logits[:, :hot] += 20.0
    return route_topk(logits, k, renormalize=True)


def _dense(w: Experts, e: int) -> torch.Tensor:
    """Expert e's weight [K, N] in fp64, dequantized through quant.primitives (independent of moe.py)."""
    if w.bits == 16:
        return w.weight[e].double().t()
    if w.bits == 4:
        return dequantize_w4(w.qweight[e], w.scales[e], w.zeros[e], w.group_size).double()
    return dequantize_w8(w.qweight[e], w.scales[e], w.group_size).double()


def _exact(x, gate_up, down, weights, ids):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (x[t].double() @ _dense(gate_up, e)).chunk(2)
            out[t] += weights[t, j].double() * ((torch.nn.functional.silu(gate) * up) @ _dense(down, e))
    return out


@pytest.mark.parametrize("fmt,dtype,tol", [("fp", torch.float32, 1e-5), ("fp", torch.bfloat16, 1e-2),
                                           ("w4g32", torch.bfloat16, 1e-2), ("w8", torch.bfloat16, 1e-2)])
def test_reference_matches_fp64(fmt, dtype, tol):
    gate_up, down = _layer(8, 64, 32, fmt, dtype)
    x = torch.randn(5, 64, dtype=dtype)
    weights, ids = _routing(5, 8, 2)
    assert rel_err(moe_experts_ref(x, gate_up, down, weights, ids), _exact(x, gate_up, down, weights, ids)) < tol


@pytest.mark.parametrize("T,k,E,hot,block_m", [(1, 1, 8, None, 16), (3, 2, 8, None, 16), (17, 2, 8, 3, 16),
                                               (17, 8, 16, None, 16), (40, 2, 64, 2, 64), (0, 2, 8, None, 16)])
def test_align_pairs(T, k, E, hot, block_m):
    _, ids = _routing(T, E, k, hot)
    n = T * k
    sorted_pairs, block_expert = mt.align_pairs(ids, E, block_m)
    assert sorted_pairs.dtype == block_expert.dtype == torch.int32
    assert sorted_pairs.numel() <= n + E * (block_m - 1)
    assert sorted_pairs.numel() == block_expert.numel() * block_m  # static: T, k, E, block_m only
    real = sorted_pairs[sorted_pairs != n]
    assert torch.equal(real.sort().values, torch.arange(n, dtype=torch.int32))  # every pair once, rest sentinel
    flat = ids.reshape(-1)
    used = block_expert >= 0
    assert used.sum() * block_m >= n and torch.equal(used, used.sort(descending=True, stable=True).values)
    assert (sorted_pairs.view(-1, block_m)[~used] == n).all()  # blocks past the runs hold only padding
    for b in used.nonzero().flatten().tolist():
        pairs = sorted_pairs[b * block_m:(b + 1) * block_m]
        pairs = pairs[pairs != n].long()
        assert pairs.numel() > 0 and (flat[pairs] == block_expert[b]).all()  # one expert a block, no empty one
        assert torch.equal(pairs, pairs.sort().values)  # pairs in order within an expert
    counts = torch.bincount(flat, minlength=E)
    blocks = torch.bincount(block_expert[used].long(), minlength=E)
    assert torch.equal(blocks, (counts + block_m - 1) // block_m)  # padding only to the next block


# (T, k, E, hot experts or None, H, I, fmt, dtype): ragged T, experts with no tokens, top-1/2/8
CASES = [
    (1, 1, 8, None, 64, 32, "fp", torch.float32),
    (3, 2, 8, None, 64, 32, "fp", torch.float32),
    (17, 2, 8, 3, 128, 64, "fp", torch.float32),
    (3, 8, 16, None, 64, 32, "fp", torch.bfloat16),
    (17, 2, 8, None, 128, 64, "fp", torch.bfloat16),
    (3, 2, 8, None, 64, 32, "w4g32", torch.bfloat16),
    (17, 2, 8, 2, 128, 64, "w4g64", torch.bfloat16),
    (3, 8, 16, None, 128, 64, "w4g64", torch.bfloat16),
    (17, 1, 8, None, 128, 64, "w8", torch.bfloat16),
    (3, 2, 8, 3, 64, 64, "w8g32", torch.bfloat16),
    (1, 8, 8, None, 64, 32, "w8g32", torch.bfloat16),
]


def _check_case(path, T, k, E, hot, H, I, fmt, dtype):
    gate_up, down = _layer(E, H, I, fmt, dtype)
    x = torch.randn(T, H, dtype=dtype)
    weights, ids = _routing(T, E, k, hot)
    ref = moe_experts_ref(x, gate_up, down, weights, ids)
    out = mt.moe_experts_triton(x, gate_up, down, weights, ids, path=path)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}k{c[1]}E{c[2]}-{c[6]}-{str(c[7])[6:]}")
def test_gemv_matches_reference(case):
    _check_case("gemv", *case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}k{c[1]}E{c[2]}-{c[6]}-{str(c[7])[6:]}")
def test_grouped_matches_reference(case):
    _check_case("grouped", *case)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 3, 7, 9, 10)],
                         ids=lambda c: f"T{c[0]}k{c[1]}E{c[2]}-{c[6]}-{str(c[7])[6:]}")
def test_gemv_split_along_k_matches_reference(case, monkeypatch):
    """Programs along K (BLOCK_K 16: 4 to 8 k steps, 2 to 4 slices): gate_up's slices meet in the workspace and
    its last program writes the activations; down's slices add into the sums. Both leave the shared workspace
    and its counters all zero (CUDA-graph replays start clean)."""
    split = {key: cfg._replace(block_k=16, split=3) for key, cfg in mt.DECODE_CONFIGS.items()}
    monkeypatch.setattr(mt, "DECODE_CONFIGS", split)
    _check_case("gemv", *case)
    ws, cnt = mt._workspace(torch.device("cpu"), 0, 0)
    assert not ws.any() and not cnt.any()


@pytest.mark.parametrize("case", [CASES[i] for i in (5, 7, 8)], ids=lambda c: f"T{c[0]}k{c[1]}-{c[6]}")
def test_gemv_rounding_weights_as_the_reference(case, monkeypatch):
    """DECODE_ROUND_WEIGHTS: each dequantized weight rounded to bf16 as the reference rounds it, so the gemv
    agrees with the reference to the last bits (the default, exact fp32 weights, only within TOL)."""
    monkeypatch.setattr(mt, "DECODE_ROUND_WEIGHTS", True)
    T, k, E, hot, H, I, fmt, dtype = case
    gate_up, down = _layer(E, H, I, fmt, dtype)
    x = torch.randn(T, H, dtype=dtype)
    weights, ids = _routing(T, E, k, hot)
    ref = moe_experts_ref(x, gate_up, down, weights, ids)
    assert rel_err(mt.moe_experts_triton(x, gate_up, down, weights, ids, path="gemv"), ref) < 1e-4


def test_grouped_full_blocks():
    """Enough pairs a expert for the largest BLOCK_M (several blocks an expert, the last one ragged)."""
    T, k, E = 520, 2, 4
    assert mt.grouped_config(T * k, E) == mt.GROUPED_CONFIGS[0][1]
    assert mt.grouped_config(T * k, E, element_size=4) == mt.GROUPED_CONFIGS[1][1]  # fp32: the big tile won't fit
    _check_case(None, T, k, E, None, 64, 32, "w4g32", torch.bfloat16)


def test_deferred_sums_are_the_output():
    """defer: the fp32 sums in the shared split-K workspace, which their reader (take) rounds and zeroes."""
    gate_up, down = _layer(8, 64, 32, "w4g32", torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    weights, ids = _routing(3, 8, 2)
    for path in ("gemv", "grouped"):
        pending = mt.moe_experts_triton(x, gate_up, down, weights, ids, path=path, defer=True)
        assert isinstance(pending, PendingSum)
        sums = pending.sums.clone()
        take(pending)
        assert not pending.sums.any()  # zeroed for the workspace's next user
        assert torch.equal(sums.to(x.dtype), mt.moe_experts_triton(x, gate_up, down, weights, ids, path=path))


@pytest.mark.parametrize("T,E,k,renormalize,dtype", [(1, 128, 8, True, torch.bfloat16), (7, 60, 4, False, torch.float32),
                                                      (5, 8, 2, True, torch.float32), (3, 16, 1, True, torch.bfloat16)])
def test_route_kernel_matches_reference(T, E, k, renormalize, dtype):
    logits = (torch.randn(T, E) * 3).to(dtype)
    weights, ids = mt.route_topk_triton(logits, k, renormalize)
    ref_w, ref_ids = route_topk_ref(logits, k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


def test_path_selection_and_empty_batch():
    assert mt.select_path(mt.GEMV_MAX_PAIRS) == "gemv" and mt.select_path(mt.GEMV_MAX_PAIRS + 1) == "grouped"
    gate_up, down = _layer(8, 64, 32, "fp", torch.bfloat16)
    weights, ids = _routing(0, 8, 2)
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    for out in (mt.moe_experts_triton(x, gate_up, down, weights, ids), moe_experts_ref(x, gate_up, down, weights, ids)):
        assert out.shape == (0, 64) and out.dtype == torch.bfloat16
