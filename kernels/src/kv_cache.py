"""store_kv: write this step's k/v rows into the paged caches at their slots (slot = block * block_size + offset).

A slot of -1 means "don't store" (padding rows, e.g. under CUDA-graph batch padding).

int8 KV (`k_cache.dtype == torch.int8`): each (slot, KV head) row of D values is quantized on write,
asymmetrically: `x ~= q * scale + zero`, q in [-128, 127], with (scale, zero) stored as fp16 in a
`[num_blocks, block_size, KVH, 2]` pool beside each cache. scale = (max - min) / 255, nudged up so that
its fp16 rounding still covers the range; zero = min + 128 * scale (the range's middle, small for centred
data, so its fp16 rounding costs little). Codes use the stored fp16 values, so a value comes back within
half a step (plus half an fp16 ulp of zero at the range's ends).
"""

import torch

from ._triton import next_pow2, tl, triton, use_triton

# scale = (max - min) * STEP: 1/255 nudged up by more than fp16's relative rounding error (2^-11), so the
# rounded scale never falls below the true one; a multiply, not a division, rounds alike in torch and Triton
STEP = (1 + 2**-10) / 255
MIN_SCALE = 2**-14  # smallest normal fp16; a constant row (max == min) gets this step and codes 0


def quantize_kv_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], fp16 (scale, zero) [..., 2])."""
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) * STEP).clamp_min(MIN_SCALE).half()
    zero = (lo + 128 * scale.float()).half()
    q = torch.floor((x - zero.float()) / scale.float() + 0.5).clamp(-128, 127).to(torch.int8)
    return q, torch.cat([scale, zero], dim=-1)


def dequantize_kv(q: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_kv_ref: q [..., D] int8, scale_zero [..., 2] -> [..., D] in dtype."""
    sz = scale_zero.float()
    return (q.float() * sz[..., :1] + sz[..., 1:]).to(dtype)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    slots = slot_mapping.long()
    k_rows = k.reshape(k.shape[0], *k_cache.shape[2:])
    v_rows = v.reshape(v.shape[0], *v_cache.shape[2:])
    # padding rows (CUDA-graph batches): drop them; CPU steps, compiled or not, have none (and a compiled
    # graph cannot branch on data)
    if not torch.compiler.is_compiling() and bool((slots < 0).any()):
        keep = slots >= 0
        slots, k_rows, v_rows = slots[keep], k_rows[keep], v_rows[keep]
    for rows, cache, scales in ((k_rows, k_cache, k_scales), (v_rows, v_cache, v_scales)):
        if cache.dtype == torch.int8:
            rows, scale_zero = quantize_kv_ref(rows)
            scales.view(-1, *scales.shape[2:]).index_copy_(0, slots, scale_zero)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, rows.to(cache.dtype))


@triton.jit
def int8_scale_zero(lo, hi, STEP: tl.constexpr, MIN_SCALE: tl.constexpr):
    """fp16 (scale, zero) of a row with range [lo, hi] (module docstring)."""
    scale = tl.maximum((hi - lo) * STEP, MIN_SCALE).to(tl.float16)
    return scale, (lo + 128 * scale.to(tl.float32)).to(tl.float16)


@triton.jit
def int8_codes(x, scale, zero):
    return tl.clamp(tl.floor((x - zero.to(tl.float32)) / scale.to(tl.float32) + 0.5), -128.0, 127.0).to(tl.int8)


@triton.jit
def _store_row(src_ptr, dst_ptr, sz_ptr, row, d, mask, D, KV_INT8: tl.constexpr, STEP: tl.constexpr,
               MIN_SCALE: tl.constexpr):
    """One (token, KV head) row of D values into cache row `row` (= slot * KVH + head)."""
    store_values(tl.load(src_ptr + d, mask=mask), dst_ptr, sz_ptr, row, d, mask, D, KV_INT8, STEP, MIN_SCALE)


@triton.jit
def store_values(x, dst_ptr, sz_ptr, row, d, mask, D, KV_INT8: tl.constexpr, STEP: tl.constexpr,
                 MIN_SCALE: tl.constexpr):
    """The loaded row x (D values at d) into cache row `row`, quantized for int8 caches."""
    if KV_INT8:
        x = x.to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        scale, zero = int8_scale_zero(lo, hi, STEP, MIN_SCALE)
        tl.store(dst_ptr + row * D + d, int8_codes(x, scale, zero), mask=mask)
        tl.store(sz_ptr + row * 2, scale)
        tl.store(sz_ptr + row * 2 + 1, zero)
    else:
        tl.store(dst_ptr + row * D + d, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, stride_k, stride_v, KVH, D,
                     BLOCK_D: tl.constexpr, KV_INT8: tl.constexpr, STEP: tl.constexpr, MIN_SCALE: tl.constexpr):
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        row = slot * KVH + h
        _store_row(k_ptr + t * stride_k + h * D, kc_ptr, ks_ptr, row, d, mask, D, KV_INT8, STEP, MIN_SCALE)
        _store_row(v_ptr + t * stride_v + h * D, vc_ptr, vs_ptr, row, d, mask, D, KV_INT8, STEP, MIN_SCALE)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    T = k.shape[0]
    _, _, KVH, D = k_cache.shape
    k2, v2 = k.reshape(T, KVH * D), v.reshape(T, KVH * D)  # views when k/v are column slices of the qkv output
    assert k2.stride(-1) == 1 and v2.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    int8 = k_cache.dtype == torch.int8
    if int8:
        assert k_scales.is_contiguous() and v_scales.is_contiguous() and k_scales.dtype == torch.float16
    if T:
        _store_kv_kernel[(T, KVH)](k2, v2, k_cache, v_cache, k_scales if int8 else k_cache,
                                   v_scales if int8 else v_cache, slot_mapping, k2.stride(0), v2.stride(0), KVH, D,
                                   BLOCK_D=next_pow2(D), KV_INT8=int8, STEP=STEP, MIN_SCALE=MIN_SCALE,
                                   num_warps=1 if D <= 128 else 2)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    """k, v [T, KVH, D] (or [T, KVH*D]); caches [num_blocks, block_size, KVH, D]; slot_mapping int [T].
    int8 caches take their fp16 (scale, zero) pools k_scales / v_scales [num_blocks, block_size, KVH, 2]."""
    (store_kv_triton if use_triton(k) else store_kv_ref)(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales)
