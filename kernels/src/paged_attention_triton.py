"""Triton paged attention over [num_blocks, block_size, KVH, D] caches. Reference: paged_attention_ref.py.

decode (one query per sequence): one program per (sequence, KV head, KV split). The program loads its KV
head's blocks once and scores them against the whole query group (GQA: H/KVH query heads, padded to 16
rows for tl.dot), so each KV byte is read once; a key tile spans several pages when pages are short.
Long contexts are split over NUM_SPLITS programs (flash-decoding); a second small kernel merges the
partial outputs by their log-sum-exp.
prefill (any query count): one program per (query tile, sequence, head), walking page-sized key tiles
from the window start to the tile's last query position. Softmax is online, in fp32, base 2.
int8 KV (KV_INT8, see kv_cache.py): both kernels read codes and per-(slot, head) fp16 (scale, zero) and
dequantize in registers, folded into the two dots (_qk, _pv), so KV bytes read are about halved. Decode
with int8 KV has its own kernel (_decode_int8_kernel) that reads the codes as int32 words and turns them
into fp16 MMA operands with one PRMT + LOP3 per pair of codes (_fp16_codes).
"""

import torch

from ._triton import INTERPRET, dot_acc, next_pow2, num_sms, pdl_args, pdl_wait, tl, triton

LOG2E = 1.4426950408889634


@triton.jit
def _key_rows(bt_ptr, s, stride_bt, b, hi, offs, BS: tl.constexpr, KVH: tl.constexpr, kvh):
    """The tile of keys starting at page b (it may span several pages): positions, cache rows
    (slot * KVH + kvh) and which pages are below hi (the end of this program's walk)."""
    pos = b * BS + offs
    page = pos // BS
    page_ok = page < hi
    block = tl.load(bt_ptr + s.to(tl.int64) * stride_bt + page, mask=page_ok, other=0).to(tl.int64)
    return pos, (block * BS + pos % BS) * KVH + kvh, page_ok


@triton.jit
def _codes(x, like, UPCAST: tl.constexpr):
    """int8 codes in like's dtype (exact). Interpreted via fp32: Triton 3.9's interpreter converts int8 -> bf16
    wrongly; compiled straight (Triton's int8 -> bf16 is a byte permute and a bf16x2 subtract)."""
    if UPCAST:
        out = x.to(tl.float32).to(like.dtype)
    else:
        out = x.to(like.dtype)
    return out


@triton.jit
def _scale_pair(pair):
    """fp32 (scale, zero) from the int32 word holding a cache row's fp16 pair (scale in the low half)."""
    s = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    z = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, z


@triton.jit
def _scale_zero(sz_ptr, row, live, MASKED: tl.constexpr):
    """fp32 (scale, zero) of int8 cache rows (slot * KVH + head), their fp16 pair read as one int32; MASKED:
    rows where live is false read 0 (stale slots past the context)."""
    pairs = sz_ptr.to(tl.pointer_type(tl.int32)) + row
    if MASKED:
        pair = tl.load(pairs, mask=live, other=0)
    else:
        pair = tl.load(pairs)
    return _scale_pair(pair)


@triton.jit
def _qk(q, q_sum, k_ptr, ks_ptr, row, d, d_ok, zeros, D, UPCAST: tl.constexpr, KV_INT8: tl.constexpr):
    """Unscaled scores q @ K^T of one key tile. int8: q @ (codes * s + z)^T = (q @ codes^T) * s + sum(q) * z,
    so the tile is only converted (int8 -> q's dtype is exact) and the scales apply per key, not per element."""
    k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=d_ok[None, :], other=0)
    if KV_INT8:
        s, z = _scale_zero(ks_ptr, row, row, False)
        scores = dot_acc(q, tl.trans(_codes(k, q, UPCAST)), zeros, UPCAST) * s[None, :] + q_sum[:, None] * z[None, :]
    else:  # (one return at the end: the compiler also walks code after a return under a constexpr if)
        scores = dot_acc(q, tl.trans(k), zeros, UPCAST)
    return scores


@triton.jit
def _pv(p, acc, q, v_ptr, vs_ptr, row, d, d_ok, live, D, UPCAST: tl.constexpr, KV_INT8: tl.constexpr):
    """acc + p @ V of one key tile. Slots past the context hold stale or uninitialised data: p is 0 there,
    but 0 * NaN is NaN, so their loads are masked. int8: p @ (codes * s + z) = (p * s) @ codes + p @ z,
    the dot in q's dtype."""
    v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=live[:, None] & d_ok[None, :], other=0)
    if KV_INT8:
        s, z = _scale_zero(vs_ptr, row, live, True)
        acc = dot_acc((p * s[None, :]).to(q.dtype), _codes(v, q, UPCAST), acc + tl.sum(p * z[None, :], axis=1)[:, None],
                      UPCAST)
    else:
        acc = dot_acc(p.to(v.dtype), v, acc, UPCAST)
    return acc


@triton.jit
def _split_walk(ctx, WINDOW, BS: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_PAGES: tl.constexpr):
    """A sequence's first visible position (sliding window: keys at positions > p - window, p = ctx - 1), its
    first and last page, and the pages a KV split walks: the walk over NUM_SPLITS splits, but at least
    MIN_PAGES pages a split. A decode graph fixes NUM_SPLITS for its longest context; a short one then
    takes fewer, longer splits (H100, batch 1 x 768 tokens: 64 splits of 1 page 9.3 us, 8 splits 6.3 us)."""
    start = tl.maximum(ctx - WINDOW, 0) if WINDOW > 0 else 0
    first, last = start // BS, tl.cdiv(ctx, BS)
    per_split = tl.maximum(tl.cdiv(last - first, NUM_SPLITS), MIN_PAGES)
    return start, first, last, per_split


@triton.jit
def _decode_pages(ctx_ptr, s, split, WINDOW, BS: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_PAGES: tl.constexpr):
    """Sequence s's context length, its first visible position and the pages [lo, hi) that KV split `split`
    walks (empty for the splits past a short context's last page, which return at once)."""
    ctx = tl.load(ctx_ptr + s)
    start, first, last, per_split = _split_walk(ctx, WINDOW, BS, NUM_SPLITS, MIN_PAGES)
    lo = first + split * per_split
    return ctx, start, lo, tl.minimum(lo + per_split, last)


@triton.jit
def _softmax_step(scores, m_i, l_i):
    """Online softmax (base 2) over one more key tile: its weights p, the rescale alpha of what came before,
    and the new running max and sum."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                   stride_qt, stride_qh, stride_bt, qk_scale, WINDOW, QG, H, D,
                   KVH: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr, KV_INT8: tl.constexpr,
                   PDL: tl.constexpr):
    s, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # context lengths are step inputs (PDL: read while the previous kernel, which stores this step's K/V,
    # finishes); an empty split leaves before waiting
    ctx, start, lo, hi = _decode_pages(ctx_ptr, s, split, WINDOW, BS, NUM_SPLITS, BLOCK_N // BS)
    if lo >= hi:  # a split past a short context's last page: the merge skips it
        return
    pdl_wait(PDL)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = g < QG, d < D
    heads = kvh * QG + g
    q = tl.load(q_ptr + s.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_sum = tl.sum(q.to(tl.float32), axis=1)  # int8 KV's zero-point term
    m_i = tl.full((BLOCK_G,), -1e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for b in range(lo, hi, BLOCK_N // BS):  # BLOCK_N // BS pages a step: small pages still give long tiles
        pos, row, page_ok = _key_rows(bt_ptr, s, stride_bt, b, hi, offs, BS, KVH, kvh)
        scores = _qk(q, q_sum, k_ptr, ks_ptr, row, d, d_ok, tl.zeros((BLOCK_G, BLOCK_N), tl.float32), D,
                     UPCAST, KV_INT8) * qk_scale
        live = (pos < ctx) & (pos >= start) & page_ok
        scores = tl.where(live[None, :], scores, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(scores, m_i, l_i)
        acc = _pv(p, acc * alpha[:, None], q, v_ptr, vs_ptr, row, d, d_ok, live, D, UPCAST, KV_INT8)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        dst = out_ptr + (s.to(tl.int64) * H + heads[:, None]) * D + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        row = (s.to(tl.int64) * H + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=row_ok)  # -inf for an empty split


@triton.jit
def _fp16_codes(words, ASM: tl.constexpr):
    """The four int8 codes c of each int32 word (lowest address first) as fp16 1152 + c, exact: fp16 0x64XX is
    1024 + XX, and XX = c + 128 is c with its sign bit flipped. ASM: for two words at a time a PRMT gathers
    their byte j and one LOP3 flips the sign bits and puts 0x64 above them, giving the fp16 pair a dot operand
    register holds (Triton's int8 -> bf16 took two shifts, a permute and a bf16x2 subtract a code, half
    of the loop's instructions). ASM off: the interpreter's path."""
    if ASM:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            "{ .reg .b32 t; "
            "prmt.b32 t, $4, $5, 0x4400; lop3.b32 $0, t, $6, $8, 0x6A; "
            "prmt.b32 t, $4, $5, 0x5511; lop3.b32 $1, t, $6, $8, 0x6A; "
            "prmt.b32 t, $4, $5, 0x6622; lop3.b32 $2, t, $6, $8, 0x6A; "
            "prmt.b32 t, $4, $5, 0x7733; lop3.b32 $3, t, $6, $8, 0x6A; }",  # 0x6A: (t & $6) ^ $8
            "=r,=r,=r,=r,r,r,r,r,r,r", [words, 0x00FF00FF, 0x64806480],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        c0 = ((((words >> 0) & 0xFF) ^ 0x80) + 1024).to(tl.float16)
        c1 = ((((words >> 8) & 0xFF) ^ 0x80) + 1024).to(tl.float16)
        c2 = ((((words >> 16) & 0xFF) ^ 0x80) + 1024).to(tl.float16)
        c3 = ((((words >> 24) & 0xFF) ^ 0x80) + 1024).to(tl.float16)
    return c0, c1, c2, c3


@triton.jit
def _dot_operand(x, FP32: tl.constexpr):
    if FP32:
        out = x.to(tl.float32)
    else:
        out = x.to(tl.float16)
    return out


@triton.jit
def _live_scale_pair(pair, live):
    """_scale_pair, 0 where live is false (the pair was loaded unmasked, ahead of time: stale slots can hold NaN)."""
    s, z = _scale_pair(pair)
    return tl.where(live, s, 0.0), tl.where(live, z, 0.0)


@triton.jit
def _decode_int8_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                        stride_qt, stride_qh, stride_bt, qk_scale, WINDOW, QG, H, D,
                        KVH: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_W: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr, ASM: tl.constexpr,
                        FP32_DOT: tl.constexpr, PDL: tl.constexpr):
    """The decode kernel for int8 KV, reading codes as int32 words: byte j of the words of a key tile holds
    dims j, j+4, j+8, ..., so scores are four dots q[:, j::4] @ K[:, j::4]^T and P @ V fills four
    accumulators for those dims. Words reach the dot operands through shared memory 4 codes at a time
    (Triton stages a plain int8 tile and reads it back one byte per element, which made int8 KV as slow
    as bf16 KV). The dots run in fp16 (fp32 for fp32 queries: FP32_DOT) on codes offset by 1152
    (_fp16_codes), so the scale/zero algebra of _qk / _pv carries the offset:
    K: q @ (c + 1152)^T * s + sum(q) * (z - 1152 s);
    V: (p s) @ (c + 1152) + p @ z - 1152 * sum(p s), the last with p s as rounded for the dot, so that the
    offset cancels exactly. Same walk and splits as _decode_kernel."""
    s, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # context lengths are step inputs (PDL: read while the previous kernel, which stores this step's K/V,
    # finishes); an empty split leaves before waiting
    ctx, start, lo, hi = _decode_pages(ctx_ptr, s, split, WINDOW, BS, NUM_SPLITS, BLOCK_N // BS)
    if lo >= hi:  # a split past a short context's last page: the merge skips it
        return
    pdl_wait(PDL)
    g = tl.arange(0, BLOCK_G)
    w = tl.arange(0, BLOCK_W)
    W = D // 4
    row_ok, w_ok = g < QG, w < W
    heads = kvh * QG + g
    q_at = q_ptr + s.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + 4 * w[None, :]
    q_mask = row_ok[:, None] & w_ok[None, :]
    q0 = _dot_operand(tl.load(q_at, mask=q_mask, other=0.0), FP32_DOT)
    q1 = _dot_operand(tl.load(q_at + 1, mask=q_mask, other=0.0), FP32_DOT)
    q2 = _dot_operand(tl.load(q_at + 2, mask=q_mask, other=0.0), FP32_DOT)
    q3 = _dot_operand(tl.load(q_at + 3, mask=q_mask, other=0.0), FP32_DOT)
    q_sum = tl.sum(q0.to(tl.float32) + q1.to(tl.float32) + q2.to(tl.float32) + q3.to(tl.float32), axis=1)
    m_i = tl.full((BLOCK_G,), -1e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc0 = tl.zeros((BLOCK_G, BLOCK_W), tl.float32)
    acc1 = tl.zeros((BLOCK_G, BLOCK_W), tl.float32)
    acc2 = tl.zeros((BLOCK_G, BLOCK_W), tl.float32)
    acc3 = tl.zeros((BLOCK_G, BLOCK_W), tl.float32)
    k_words = k_ptr.to(tl.pointer_type(tl.int32))
    v_words = v_ptr.to(tl.pointer_type(tl.int32))
    ks_pairs = ks_ptr.to(tl.pointer_type(tl.int32))
    vs_pairs = vs_ptr.to(tl.pointer_type(tl.int32))
    offs = tl.arange(0, BLOCK_N)
    STEP: tl.constexpr = BLOCK_N // BS
    # the next tile's cache rows and (scale, zero) pairs are loaded at the top of a step: Triton pipelines only
    # the word loads, and the chain block table -> rows -> scales would otherwise stall every step
    _, row, _ = _key_rows(bt_ptr, s, stride_bt, lo, hi, offs, BS, KVH, kvh)
    k_pairs = tl.load(ks_pairs + row)
    v_pairs = tl.load(vs_pairs + row)
    for b in range(lo, hi, STEP):
        pos = b * BS + offs
        page_ok = pos // BS < hi
        _, next_row, _ = _key_rows(bt_ptr, s, stride_bt, b + STEP, hi, offs, BS, KVH, kvh)  # past hi: block 0
        next_k_pairs = tl.load(ks_pairs + next_row)
        next_v_pairs = tl.load(vs_pairs + next_row)
        kw = tl.load(k_words + row[:, None] * W + w[None, :], mask=w_ok[None, :], other=0)
        k0, k1, k2, k3 = _fp16_codes(kw, ASM)
        dots = dot_acc(q0, tl.trans(_dot_operand(k0, FP32_DOT)), tl.zeros((BLOCK_G, BLOCK_N), tl.float32), UPCAST)
        dots = dot_acc(q1, tl.trans(_dot_operand(k1, FP32_DOT)), dots, UPCAST)
        dots = dot_acc(q2, tl.trans(_dot_operand(k2, FP32_DOT)), dots, UPCAST)
        dots = dot_acc(q3, tl.trans(_dot_operand(k3, FP32_DOT)), dots, UPCAST)
        live = (pos < ctx) & (pos >= start) & page_ok
        k_scale, k_zero = _live_scale_pair(k_pairs, live)
        scores = (dots * k_scale[None, :] + q_sum[:, None] * (k_zero - 1152.0 * k_scale)[None, :]) * qk_scale
        scores = tl.where(live[None, :], scores, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(scores, m_i, l_i)
        vw = tl.load(v_words + row[:, None] * W + w[None, :], mask=live[:, None] & w_ok[None, :], other=0)
        v0, v1, v2, v3 = _fp16_codes(vw, ASM)
        v_scale, v_zero = _live_scale_pair(v_pairs, live)
        ps = _dot_operand((p * v_scale[None, :]), FP32_DOT)
        pz = tl.sum(p * v_zero[None, :] - 1152.0 * ps.to(tl.float32), axis=1)[:, None]
        acc0 = dot_acc(ps, _dot_operand(v0, FP32_DOT), acc0 * alpha[:, None] + pz, UPCAST)
        acc1 = dot_acc(ps, _dot_operand(v1, FP32_DOT), acc1 * alpha[:, None] + pz, UPCAST)
        acc2 = dot_acc(ps, _dot_operand(v2, FP32_DOT), acc2 * alpha[:, None] + pz, UPCAST)
        acc3 = dot_acc(ps, _dot_operand(v3, FP32_DOT), acc3 * alpha[:, None] + pz, UPCAST)
        m_i = m_new
        row, k_pairs, v_pairs = next_row, next_k_pairs, next_v_pairs
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        dst = out_ptr + (s.to(tl.int64) * H + heads[:, None]) * D + 4 * w[None, :]
        dtype = out_ptr.dtype.element_ty
    else:
        dst = part_o_ptr + ((s.to(tl.int64) * H + heads[:, None]) * NUM_SPLITS + split) * D + 4 * w[None, :]
        dtype = tl.float32
        tl.store(part_lse_ptr + (s.to(tl.int64) * H + heads) * NUM_SPLITS + split, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(dst, (acc0 * inv).to(dtype), mask=q_mask)
    tl.store(dst + 1, (acc1 * inv).to(dtype), mask=q_mask)
    tl.store(dst + 2, (acc2 * inv).to(dtype), mask=q_mask)
    tl.store(dst + 3, (acc3 * inv).to(dtype), mask=q_mask)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, ctx_ptr, WINDOW, H, D, BS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  MIN_PAGES: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # s * H + head
    _, first, last, per_split = _split_walk(tl.load(ctx_ptr + row // H), WINDOW, BS, NUM_SPLITS, MIN_PAGES)
    pdl_wait(PDL)
    sp = tl.arange(0, NUM_SPLITS)
    live = sp < tl.cdiv(last - first, per_split)  # the splits that walked any page
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + sp, mask=live, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(part_o_ptr + (row * NUM_SPLITS + sp[:, None]) * D + d[None, :], mask=live[:, None] & (d < D)[None, :],
                other=0.0)
    o = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr, stride_qt, stride_qh,
                    stride_bt, qk_scale, WINDOW, QG, H, D, KVH: tl.constexpr, BS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                    KV_INT8: tl.constexpr):
    tile, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_begin = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q_begin
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + s)
    kvh = h // QG
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = i < q_len, d < D
    t = (q_begin + i).to(tl.int64)
    q = tl.load(q_ptr + t[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_sum = tl.sum(q.to(tl.float32), axis=1)  # int8 KV's zero-point term
    q_pos = ctx - q_len + i
    last_pos = ctx - q_len + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1
    first_pos = tl.maximum(ctx - q_len + tile * BLOCK_M - WINDOW + 1, 0) if WINDOW > 0 else 0
    m_i = tl.full((BLOCK_M,), -1e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    offs = tl.arange(0, BLOCK_N)
    hi = last_pos // BS + 1
    for b in range(first_pos // BS, hi, BLOCK_N // BS):
        k_pos, row, page_ok = _key_rows(bt_ptr, s, stride_bt, b, hi, offs, BS, KVH, kvh)
        scores = _qk(q, q_sum, k_ptr, ks_ptr, row, d, d_ok, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), D,
                     UPCAST, KV_INT8) * qk_scale
        ok = k_pos[None, :] <= q_pos[:, None]
        if WINDOW > 0:
            ok &= k_pos[None, :] > q_pos[:, None] - WINDOW
        scores = tl.where(ok, scores, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(scores, m_i, l_i)
        acc = _pv(p, acc * alpha[:, None], q, v_ptr, vs_ptr, row, d, d_ok, (k_pos <= last_pos) & page_ok, D,
                  UPCAST, KV_INT8)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (t[:, None] * H + h) * D + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def num_kv_splits(num_seqs, num_kv_heads, max_blocks, sms):
    """Split the KV walk only when (sequences x KV heads) cannot fill the SMs twice over; keep >= 4 blocks a split."""
    want = -(-2 * sms // max(1, num_seqs * num_kv_heads))
    return max(1, min(next_pow2(want), max(1, max_blocks // 4), 64))


def decode_tile(block_size: int, kv_int8: bool = False, words: bool = True) -> int:
    """Keys per decode step: at least 64, so short pages still give the loads and the dot some length (128 for
    the int8 byte-tile kernel: the same bytes a step)."""
    return max(block_size, 128 if kv_int8 and not words else 64)


def decode_launch(kv_int8: bool, words: bool = True, warps=None, stages=None) -> dict:
    """Launch options of the decode kernel, from sweeps on an H100 (64 x 4096 tokens, block 16, 32q / 8kv heads):
    int8 word kernel 2 warps, 3 stages, 64 keys: 196 us (bf16 KV: 340-350 us; 18 combinations of 32-128 keys,
    2-8 warps, 2-3 stages: 0.7-1.76x); int8 byte-tile kernel 8 warps, 2 stages, 128 keys: 344 us."""
    if kv_int8 and words:
        return {"num_warps": warps or 2, "num_stages": stages or 3}
    options = {"num_warps": warps or (8 if kv_int8 else 4)}
    if stages or kv_int8:
        options["num_stages"] = stages or 2
    return options


def paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                           sliding_window=None, max_seqlen_q=None, num_splits=None, k_scales=None, v_scales=None,
                           decode_keys=None, decode_warps=None, decode_stages=None, decode_words=True, decode_rows=0):
    """decode_rows: how many leading sequences of a mixed step have exactly one query (known on the host):
    they go through the decode kernel (each KV head read once for its query group) instead of the prefill
    kernel (a 16-64-row query tile per query head for one row). decode_keys: keys per decode step (a power
    of two >= block size; default decode_tile); decode_warps / decode_stages: the decode kernel's launch
    options (default decode_launch); decode_words=False: int8 KV decode through the byte-tile kernel
    (_decode_kernel) instead of _decode_int8_kernel. For tuning."""
    T, H, D = q.shape
    S = context_lens.shape[0]
    int8 = k_cache.dtype == torch.int8
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if int8:  # the (scale, zero) pools: read as [slot * KVH + head, 2]
        assert k_scales.is_contiguous() and v_scales.is_contiguous() and k_scales.shape == (*k_cache.shape[:3], 2)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    caches = (k_cache, v_cache, k_scales if int8 else k_cache, v_scales if int8 else v_cache)
    tuning = dict(num_splits=num_splits, keys=decode_keys, warps=decode_warps, stages=decode_stages, words=decode_words)
    if T == S:  # decode: no host sync needed
        _decode(q, caches, block_tables, context_lens, out, scale, sliding_window, **tuning)
        return out
    d = decode_rows
    if d:  # one KV split: the kernel variant the big decode graphs already compiled (a new split count would
        # compile mid-run), and the step's prefill part fills the GPU anyway
        tuning["num_splits"] = num_splits or 1
        _decode(q[:d], caches, block_tables[:d], context_lens[:d], out[:d], scale, sliding_window, **tuning)
        q, block_tables, context_lens, cu_seqlens_q = q[d:], block_tables[d:], context_lens[d:], cu_seqlens_q[d:] - d
    _prefill(q, caches, block_tables, cu_seqlens_q, context_lens, out[d:], scale, sliding_window, max_seqlen_q)
    return out


def _decode(q, caches, block_tables, context_lens, out, scale, sliding_window, num_splits, keys, warps, stages,
            words):
    """One query per sequence: rows of q and out are the sequences."""
    S, H, D = q.shape
    k_cache = caches[0]
    _, BS, KVH, _ = k_cache.shape
    int8 = k_cache.dtype == torch.int8
    # the merge kernel needs a power of two
    splits = next_pow2(num_splits or num_kv_splits(S, KVH, block_tables.shape[1], num_sms(q.device)))
    part_o = torch.empty(S, H, splits, D, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_lse = torch.empty(S, H, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    args = (q, *caches, block_tables, context_lens, out, part_o, part_lse, q.stride(0), q.stride(1),
            block_tables.stride(0), scale * LOG2E, sliding_window or 0, H // KVH, H, D)
    words = int8 and D % 4 == 0 and words
    shape = dict(KVH=KVH, BS=BS, BLOCK_N=keys or decode_tile(BS, int8, words),
                 BLOCK_G=max(16, next_pow2(H // KVH)), NUM_SPLITS=splits, UPCAST=INTERPRET)
    launch = dict(decode_launch(int8, words, warps, stages), **pdl_args(q.device))
    if words:
        _decode_int8_kernel[(S, KVH, splits)](*args, **shape, BLOCK_W=max(16, next_pow2(D // 4)),
                                               ASM=not INTERPRET, FP32_DOT=q.dtype == torch.float32, **launch)
    else:
        _decode_kernel[(S, KVH, splits)](*args, **shape, BLOCK_D=next_pow2(D), KV_INT8=int8, **launch)
    if splits > 1:
        _merge_kernel[(S * H,)](part_o, part_lse, out, context_lens, sliding_window or 0, H, D, BS=BS,
                                NUM_SPLITS=splits, MIN_PAGES=shape["BLOCK_N"] // BS, BLOCK_D=next_pow2(D), num_warps=4,
                                **pdl_args(q.device))


def _prefill(q, caches, block_tables, cu_seqlens_q, context_lens, out, scale, sliding_window, max_seqlen_q):
    T, H, D = q.shape
    S = context_lens.shape[0]
    k_cache = caches[0]
    _, BS, KVH, _ = k_cache.shape
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    BLOCK_M = 64 if max_seqlen_q > 32 and not INTERPRET else 16
    grid = (triton.cdiv(max_seqlen_q, BLOCK_M), S, H)
    # key tiles of one page (tl.dot needs >= 16 keys: pages under 16 tokens are walked in groups)
    _prefill_kernel[grid](q, *caches, block_tables, cu_seqlens_q, context_lens, out, q.stride(0), q.stride(1),
                          block_tables.stride(0), scale * LOG2E, sliding_window or 0, H // KVH, H, D,
                          BLOCK_N=max(BS, 16), BLOCK_M=BLOCK_M, num_warps=4, num_stages=2, KVH=KVH, BS=BS,
                          BLOCK_D=next_pow2(D), UPCAST=INTERPRET, KV_INT8=k_cache.dtype == torch.int8)
