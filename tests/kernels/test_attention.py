"""Paged attention and store_kv: Triton (interpreted) vs the torch reference vs an fp64 naive loop.

Tolerances (relative Frobenius error): Triton vs reference 1e-2 in bf16 (P is rounded to bf16 before
P @ V, SDPA keeps it fp32); in fp32 every path against the naive fp64 loop within attention_fp32_tol, the
rounding bound of the sums it takes (kernel_testing.py).
int8 KV: the same cases on quantized caches (the naive loop reads them dequantized; the decode kernel's
offset codes widen its bound), and store_kv's quantization must give every value back within half a
quantization step.
"""

import math

import pytest
import torch

from lmconvert.kernels import paged_attention, store_kv
from lmconvert.kernels.kv_cache import dequantize_kv, quantize_kv_ref, store_kv_ref, store_kv_triton
from lmconvert.kernels.paged_attention_ref import paged_attention_ref
from lmconvert.kernels.paged_attention_triton import num_kv_splits, paged_attention_triton

from kernel_testing import attention_fp32_tol, rel_err


def make_batch(block_size, H, KVH, D, ctxs, q_lens, dtype):
    """Caches with each sequence's blocks scattered at random, block tables padded with -1."""
    nb = [-(-c // block_size) for c in ctxs]
    num_blocks = sum(nb) + 2
    k_cache = torch.randn(num_blocks, block_size, KVH, D, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, KVH, D, dtype=dtype)
    perm = torch.randperm(num_blocks).int()
    tables = torch.full((len(ctxs), max(nb) + 1), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(nb):
        tables[s, :n] = perm[used:used + n]
        used += n
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    q = torch.randn(int(cu[-1]), H, D, dtype=dtype)
    return q, k_cache, v_cache, tables, cu, torch.tensor(ctxs, dtype=torch.int32)


def quantized(batch):
    """The batch with int8 caches and their (scale, zero) pools appended (paged_attention's k/v_scales),
    and the dequantized fp32 caches the naive loop reads instead."""
    q, k_cache, v_cache, tables, cu, ctx = batch
    (kq, ks), (vq, vs) = quantize_kv_ref(k_cache), quantize_kv_ref(v_cache)
    plain = (q, dequantize_kv(kq, ks, torch.float32), dequantize_kv(vq, vs, torch.float32), tables, cu, ctx)
    return (q, kq, vq, tables, cu, ctx), (ks, vs), plain


def naive_attention(q, k_cache, v_cache, tables, cu, ctx, scale, window):
    out = torch.empty(q.shape, dtype=torch.float64)
    H, KVH = q.shape[1], k_cache.shape[2]
    for s in range(len(ctx)):
        L = int(ctx[s])
        k = k_cache[tables[s].long()].flatten(0, 1)[:L].double().repeat_interleave(H // KVH, dim=1)
        v = v_cache[tables[s].long()].flatten(0, 1)[:L].double().repeat_interleave(H // KVH, dim=1)
        for t in range(int(cu[s]), int(cu[s + 1])):
            p = L - (int(cu[s + 1]) - t)  # this query's position
            keys = [j for j in range(L) if j <= p and (window is None or j > p - window)]
            scores = torch.einsum("hd,lhd->hl", q[t].double(), k[keys]) * scale
            out[t] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[keys])
    return out


CASES = [  # block_size, H, KVH, D, context lens, query lens, window
    (16, 8, 8, 32, [37, 5, 64], [1, 1, 1], None),  # decode, MHA, ragged
    (32, 8, 2, 64, [100, 33, 1], [1, 1, 1], None),  # decode, GQA 4
    (16, 8, 1, 32, [90, 17], [1, 1], 20),  # decode, GQA 8, sliding window
    (64, 4, 1, 32, [130, 70], [1, 1], None),  # block 64
    (16, 8, 2, 32, [37, 20, 64], [5, 20, 1], None),  # prefill: prefix-cached, fresh, mixed decode row
    (32, 4, 4, 32, [70, 45], [33, 12], 10),  # chunked prefill with a window
    (8, 4, 2, 32, [29, 12, 40], [1, 12, 9], 16),  # pages shorter than a key tile, mixed decode / prefill
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_fp32(case):
    bs, H, KVH, D, ctxs, q_lens, window = case
    batch = make_batch(bs, H, KVH, D, ctxs, q_lens, torch.float32)
    ref = paged_attention_ref(*batch, 1 / math.sqrt(D), window)
    assert rel_err(ref, naive_attention(*batch, 1 / math.sqrt(D), window)) < attention_fp32_tol(D, max(ctxs))
    assert torch.equal(paged_attention(*batch, 1 / math.sqrt(D), window), ref)  # CPU dispatch


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference(case, dtype):
    bs, H, KVH, D, ctxs, q_lens, window = case
    batch = make_batch(bs, H, KVH, D, ctxs, q_lens, dtype)
    out = paged_attention_triton(*batch, 1 / math.sqrt(D), window)
    if dtype == torch.bfloat16:
        assert rel_err(out, paged_attention_ref(*batch, 1 / math.sqrt(D), window)) < 1e-2
    else:
        assert rel_err(out, naive_attention(*batch, 1 / math.sqrt(D), window)) < attention_fp32_tol(D, max(ctxs))


@pytest.mark.parametrize("case", CASES)
def test_int8_reference_matches_naive(case):
    bs, H, KVH, D, ctxs, q_lens, window = case
    fp = make_batch(bs, H, KVH, D, ctxs, q_lens, torch.float32)
    batch, scales, plain = quantized(fp)
    ref = paged_attention_ref(*batch, 1 / math.sqrt(D), window, *scales)
    assert rel_err(ref, naive_attention(*plain, 1 / math.sqrt(D), window)) < attention_fp32_tol(D, max(ctxs))
    assert torch.equal(paged_attention(*batch, 1 / math.sqrt(D), window, *scales), ref)  # CPU dispatch
    # and close to attention over the unquantized caches (normal data: steps of ~1/40 of a value's spread)
    assert rel_err(ref, paged_attention_ref(*fp, 1 / math.sqrt(D), window)) < 2e-2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_triton_matches_reference(case, dtype):
    bs, H, KVH, D, ctxs, q_lens, window = case
    batch, scales, plain = quantized(make_batch(bs, H, KVH, D, ctxs, q_lens, dtype))
    out = paged_attention_triton(*batch, 1 / math.sqrt(D), window, k_scales=scales[0], v_scales=scales[1])
    if dtype == torch.bfloat16:
        assert rel_err(out, paged_attention_ref(*batch, 1 / math.sqrt(D), window, *scales)) < 1e-2
    else:
        exact = naive_attention(*plain, 1 / math.sqrt(D), window)
        assert rel_err(out, exact) < attention_fp32_tol(D, max(ctxs), int8_kv=True)


@pytest.mark.parametrize("splits", [2, 8])
def test_int8_split_kv_decode(splits):
    batch, scales, plain = quantized(make_batch(16, 8, 2, 32, [150, 9, 64], [1, 1, 1], torch.float32))
    out = paged_attention_triton(*batch, 0.2, 40, num_splits=splits, k_scales=scales[0], v_scales=scales[1])
    assert rel_err(out, naive_attention(*plain, 0.2, 40)) < attention_fp32_tol(32, 150, int8_kv=True)


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_split_kv_decode_matches_unsplit(splits):
    batch = make_batch(16, 8, 2, 32, [150, 9, 64], [1, 1, 1], torch.float32)
    # 8 splits over <= 10 blocks leaves some splits empty (window): their -inf lse must drop out
    out = paged_attention_triton(*batch, 0.2, 40, num_splits=splits)
    assert rel_err(out, naive_attention(*batch, 0.2, 40)) < attention_fp32_tol(32, 150)


@pytest.mark.parametrize("window", [None, 200])
def test_split_count_of_the_graph_over_short_and_long_contexts(window):
    # a decode graph's split count is fixed for its longest context: 16 splits of >= 4 pages (64 keys) give
    # the 600-token sequence 10 splits and the short ones one or two; the rest stay empty and are skipped
    batch = make_batch(16, 8, 2, 32, [600, 9, 70], [1, 1, 1], torch.float32)
    out = paged_attention_triton(*batch, 0.2, window, num_splits=16)
    assert rel_err(out, naive_attention(*batch, 0.2, window)) < attention_fp32_tol(32, 600)


def test_num_kv_splits():
    assert num_kv_splits(64, 8, 256, 132) == 1  # 512 programs already fill 132 SMs
    assert num_kv_splits(1, 8, 256, 132) == 64  # one long sequence: split up to the cap
    assert num_kv_splits(1, 8, 8, 132) == 2  # short context: keep >= 4 blocks a split


@pytest.mark.parametrize("triton_path", [False, True])
def test_store_kv(triton_path):
    T, KVH, D, bs = 6, 2, 32, 16
    qkv = torch.randn(T, (4 + 2 * KVH) * D, dtype=torch.bfloat16)
    k = qkv[:, 4 * D:(4 + KVH) * D].view(T, KVH, D)  # strided views, as the runtime slices them
    v = qkv[:, (4 + KVH) * D:].view(T, KVH, D)
    slots = torch.tensor([3, 17, -1, 40, 41, 0])
    k_cache, v_cache = torch.zeros(4, bs, KVH, D, dtype=torch.bfloat16), torch.zeros(4, bs, KVH, D, dtype=torch.bfloat16)
    (store_kv_triton if triton_path else store_kv)(k, v, k_cache, v_cache, slots)
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(kf[slot], k[t]) and torch.equal(vf[slot], v[t])
    assert kf.abs().sum(dim=(1, 2)).count_nonzero() == 5  # nothing else written, -1 skipped
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    store_kv_ref(k, v, k2, v2, slots)
    assert torch.equal(k2, k_cache) and torch.equal(v2, v_cache)


def int8_pools(num_blocks, bs, KVH, D):
    return (torch.zeros(num_blocks, bs, KVH, D, dtype=torch.int8), torch.zeros(num_blocks, bs, KVH, D, dtype=torch.int8),
            torch.zeros(num_blocks, bs, KVH, 2, dtype=torch.float16), torch.zeros(num_blocks, bs, KVH, 2, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_int8_round_trip(dtype):
    T, KVH, D, bs = 7, 2, 64, 16
    qkv = torch.randn(T, (4 + 2 * KVH) * D, dtype=dtype) * 3 + 0.5
    qkv[1] = 0.25  # a constant row: max == min
    qkv[2, :D // 2] *= 40  # an outlier-heavy row
    k, v = qkv[:, 4 * D:(4 + KVH) * D].view(T, KVH, D), qkv[:, (4 + KVH) * D:].view(T, KVH, D)
    slots = torch.tensor([3, 17, -1, 40, 41, 0, 63])
    tri, ref = int8_pools(4, bs, KVH, D), int8_pools(4, bs, KVH, D)
    store_kv_triton(k, v, *tri[:2], slots, *tri[2:])
    store_kv(k, v, *ref[:2], slots, *ref[2:])  # CPU dispatch: the reference
    for a, b in zip(tri, ref):
        assert (a.float() - b.float()).abs().max() <= (1 if a.dtype == torch.int8 else 0)  # a code may round apart
    for x, cache, pool in ((k, tri[0], tri[2]), (v, tri[1], tri[3])):
        codes, sz = cache.flatten(0, 1), pool.flatten(0, 1)
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            back = dequantize_kv(codes[slot], sz[slot], torch.float64)
            scale, zero = sz[slot, :, 0].double(), sz[slot, :, 1].double()
            # half a step; at the range's ends also half an fp16 ulp of zero (its rounding)
            bound = 0.5 * scale * (1 + 1e-6) + zero.abs() * 2**-11
            assert ((back - x[t].double()).abs() <= bound[:, None]).all()
        written = codes.flatten(1).abs().sum(1).count_nonzero() + sz.flatten(1).abs().sum(1).count_nonzero()
        assert written <= 2 * 6  # the -1 slot wrote nothing
    assert tri[2].flatten(0, 1)[40].float().min() > 0  # scales of written rows are positive


MIXED = [  # block_size, H, KVH, D, context lens, query lens (the leading one-query rows are decodes), window
    (16, 8, 2, 32, [37, 90, 20, 64], [1, 1, 20, 5], None),
    (8, 8, 1, 32, [29, 12, 40], [1, 12, 9], 16),  # GQA 8, short pages, a window
]


@pytest.mark.parametrize("case", MIXED)
@pytest.mark.parametrize("int8", [False, True])
def test_mixed_step_decode_rows_take_the_decode_kernel(case, int8):
    """A mixed step with decode_rows: its leading decodes through the decode kernel, the rest through the
    prefill kernel on the shifted cu_seqlens, into one output — the same attention as without the split."""
    from lmconvert.runtime.context import leading_decodes

    bs, H, KVH, D, ctxs, q_lens, window = case
    batch = make_batch(bs, H, KVH, D, ctxs, q_lens, torch.float32)
    scales, plain = (), batch
    if int8:
        batch, scales, plain = quantized(batch)
    cu = batch[4].tolist()
    rows = leading_decodes(cu)
    assert rows == q_lens.index(next(n for n in q_lens if n > 1))
    kv = dict(k_scales=scales[0], v_scales=scales[1]) if int8 else {}
    out = paged_attention_triton(*batch, 1 / math.sqrt(D), window, max_seqlen_q=max(q_lens), decode_rows=rows, **kv)
    exact = naive_attention(*plain, 1 / math.sqrt(D), window)
    assert rel_err(out, exact) < attention_fp32_tol(D, max(ctxs), int8_kv=int8)
    assert leading_decodes([0, 1, 2, 3]) == 3 and leading_decodes([0, 4, 5]) == 0
