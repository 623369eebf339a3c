"""rope_and_store: the step from a decoder layer's qkv projection to paged attention in one launch.

Per token it splits qkv into q / k / v heads, applies Qwen3's per-head q / k RMSNorm (when given), rotates
q and k (RoPE), writes k and v into the paged cache (int8 caches quantize them) and returns q. The
separate kernels (two norms, two RoPE launches, the store) cost five launches a layer, which at batch 1
take longer than their work; the fused kernel rounds exactly as they do (model dtype after the norm and
after the rotation), so the reference is just their composition.
"""

import torch

from ._triton import pdl_args, pdl_wait, tl, triton, use_triton
from .kv_cache import MIN_SCALE, STEP, int8_codes, int8_scale_zero, store_kv_ref, store_values
from .pending import load_pending, unwrap
from .norm import rms_norm_ref
from .rope import apply_rope_ref


def _split(qkv, num_heads, num_kv_heads, head_dim):
    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.reshape(T, num_heads, head_dim), k.reshape(T, num_kv_heads, head_dim),
            v.reshape(T, num_kv_heads, head_dim))


def rope_and_store_ref(qkv, num_heads, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                       q_norm=None, k_norm=None, eps=1e-6, k_scales=None, v_scales=None):
    q, k, v = _split(qkv, num_heads, k_cache.shape[2], k_cache.shape[3])
    if q_norm is not None:
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    q, k = apply_rope_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales)
    return q


@triton.jit
def _norm_halves(src, x1, x2, w_ptr, cols, eps, HALF: tl.constexpr, PENDING: tl.constexpr):
    """RMSNorm of the head at src, given as its two halves, rounded as norm.rms_norm_ref (dtype, then times
    weight). The sum of squares runs over the whole row, in the order the RMSNorm kernel sums it (PENDING:
    the row at src is zeroed by now, so it is summed from the halves, in another order)."""
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    if PENDING:
        sum_sq = tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)
    else:
        xf = tl.load(src + tl.arange(0, 2 * HALF)).to(tl.float32)
        sum_sq = tl.sum(xf * xf, axis=0)
    rstd = 1.0 / tl.sqrt(sum_sq / (2 * HALF) + eps)
    w1 = tl.load(w_ptr + cols).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + cols).to(tl.float32)
    n1 = ((f1 * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype)
    n2 = ((f2 * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype)
    return n1, n2


@triton.jit
def _rope_and_store_kernel(qkv_ptr, pos_ptr, cache_ptr, qw_ptr, kw_ptr, q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
                           slot_ptr, stride_t, H, KVH, eps, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                           KV_INT8: tl.constexpr, STEP: tl.constexpr, MIN_SCALE: tl.constexpr, PENDING: tl.constexpr,
                           PDL: tl.constexpr):
    """Program (token t, head h): h < H rotates q head h; else KV head h - H: k normed, rotated, stored; v stored.
    PENDING: qkv is a split-K linear's fp32 sums (pending.py), each read once here, rounded and zeroed."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)  # step inputs and tables: loaded while the qkv GEMV finishes
    cos = tl.load(cache_ptr + pos * 2 * HALF + cols)
    sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + cols)
    pdl_wait(PDL)
    is_q = h < H
    kvh = h - H
    if is_q:
        src = qkv_ptr + t * stride_t + h * 2 * HALF
        w_ptr = qw_ptr
    else:
        src = qkv_ptr + t * stride_t + (H + kvh) * 2 * HALF
        w_ptr = kw_ptr
    x1 = load_pending(src + cols, cols < HALF, q_ptr, PENDING)
    x2 = load_pending(src + HALF + cols, cols < HALF, q_ptr, PENDING)
    if QK_NORM:
        x1, x2 = _norm_halves(src, x1, x2, w_ptr, cols, eps, HALF, PENDING)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (f1 * cos - f2 * sin).to(x1.dtype)
    r2 = (f2 * cos + f1 * sin).to(x1.dtype)
    if is_q:
        dst = q_ptr + (t * H + h) * 2 * HALF
        tl.store(dst + cols, r1)
        tl.store(dst + HALF + cols, r2)
    else:
        d = tl.arange(0, 2 * HALF)
        v = load_pending(qkv_ptr + t * stride_t + (H + KVH + kvh) * 2 * HALF + d, d < 2 * HALF, q_ptr, PENDING)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # (padding rows of a graph batch store nothing, but their sums were read and zeroed)
            row = slot * KVH + kvh
            dst = kc_ptr + row * 2 * HALF
            if KV_INT8:
                g1, g2 = r1.to(tl.float32), r2.to(tl.float32)
                lo = tl.minimum(tl.min(g1, axis=0), tl.min(g2, axis=0))
                hi = tl.maximum(tl.max(g1, axis=0), tl.max(g2, axis=0))
                scale, zero = int8_scale_zero(lo, hi, STEP, MIN_SCALE)
                tl.store(dst + cols, int8_codes(g1, scale, zero))
                tl.store(dst + HALF + cols, int8_codes(g2, scale, zero))
                tl.store(ks_ptr + row * 2, scale)
                tl.store(ks_ptr + row * 2 + 1, zero)
            else:
                tl.store(dst + cols, r1.to(kc_ptr.dtype.element_ty))
                tl.store(dst + HALF + cols, r2.to(kc_ptr.dtype.element_ty))
            store_values(v, vc_ptr, vs_ptr, row, d, d < 2 * HALF, 2 * HALF, KV_INT8, STEP, MIN_SCALE)


def rope_and_store_triton(qkv, num_heads, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                          q_norm=None, k_norm=None, eps=1e-6, k_scales=None, v_scales=None):
    src, pending = unwrap(qkv)  # pending: a split-K linear's sums, read, rounded and zeroed by the kernel
    T = src.shape[0]
    _, _, KVH, D = k_cache.shape
    assert src.stride(-1) == 1 and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
    assert D & (D - 1) == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
    int8 = k_cache.dtype == torch.int8
    q = torch.empty(T, num_heads, D, dtype=qkv.dtype, device=src.device)
    if T:
        norm = q_norm is not None
        _rope_and_store_kernel[(T, num_heads + KVH)](
            src, positions, cos_sin_cache, q_norm if norm else q, k_norm if norm else q, q, k_cache, v_cache,
            k_scales if int8 else k_cache, v_scales if int8 else v_cache, slot_mapping, src.stride(0), num_heads,
            KVH, eps, HALF=D // 2, QK_NORM=norm, KV_INT8=int8, STEP=STEP, MIN_SCALE=MIN_SCALE, PENDING=pending,
            num_warps=1, **pdl_args(src.device))
    return q


def rope_and_store(qkv, num_heads, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                   q_norm=None, k_norm=None, eps=1e-6, k_scales=None, v_scales=None):
    """qkv [T, (H + 2 KVH) * D] (q ‖ k ‖ v heads; or a PendingSum), positions [T], caches [num_blocks,
    block_size, KVH, D] (+ fp16 (scale, zero) pools for int8 caches), slot_mapping [T] (-1: not stored);
    q_norm / k_norm: the per-head RMSNorm weights [D] (Qwen3) or None. Stores k (normed, rotated) and v;
    returns q [T, H, D]."""
    fn = rope_and_store_triton if use_triton(qkv) else rope_and_store_ref
    return fn(qkv, num_heads, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q_norm, k_norm, eps,
              k_scales, v_scales)
