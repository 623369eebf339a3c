"""Rotary position embedding, neox style (rotate-half), as in HF llama / qwen2 / qwen3 / mistral.

The cache is fp32 [max_pos, head_dim]: cos of the D/2 frequencies ‖ sin of them, one row per position.
build_rope_cache is the one place the frequencies (and rope_scaling) are computed; the test checks it
against transformers' own rope init functions.
"""

import math

import torch

from lmconvert.errors import UserError

from ._triton import next_pow2, tl, triton, use_triton


def _llama3_inv_freq(inv_freq, scaling):
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(is_mid, blended, out)


def rope_inv_freq(head_dim, theta, scaling=None, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise UserError(f"rope_scaling type {kind!r} is not supported (supported: none, linear, llama3)")


def build_rope_cache(head_dim, max_pos, theta, scaling=None, device=None):
    """-> fp32 [max_pos, head_dim]: cos ‖ sin of positions 0..max_pos-1."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device)
    freqs = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _as_heads(x, head_dim):
    return x.view(x.shape[0], -1, head_dim)


def _rotate_ref(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_ref(q, k, positions, cos_sin_cache):
    D = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2]
    q_out = _rotate_ref(_as_heads(q, D), cos, sin).view(q.shape)
    k_out = _rotate_ref(_as_heads(k, D), cos, sin).view(k.shape)
    return q_out, k_out


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cache_ptr, out_ptr, H, stride_t, stride_h,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cache_ptr + pos * 2 * HALF + cols)[None, :]
    sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + cols)[None, :]
    mask = (heads < H)[:, None]
    src = x_ptr + t.to(tl.int64) * stride_t + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + (t.to(tl.int64) * H + heads[:, None]) * 2 * HALF + cols[None, :]
    tl.store(dst, (x1.to(tl.float32) * cos - x2 * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1.to(tl.float32) * sin).to(x1.dtype), mask=mask)


def _rope_one(x, positions, cache):
    D = cache.shape[-1]
    xh = _as_heads(x, D) if x.stride(-1) == 1 and x.dim() == 3 else x.reshape(x.shape[0], -1, D)
    T, H, _ = xh.shape
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    BLOCK_H = min(next_pow2(H), 16)
    if T:
        _rope_kernel[(T, triton.cdiv(H, BLOCK_H))](xh, positions, cache, out, H, xh.stride(0), xh.stride(1),
                                                   HALF=D // 2, BLOCK_H=BLOCK_H, num_warps=4)
    return out.view(x.shape)


def apply_rope_triton(q, k, positions, cos_sin_cache):
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
    return _rope_one(q, positions, cos_sin_cache), _rope_one(k, positions, cos_sin_cache)


def apply_rope(q, k, positions, cos_sin_cache):
    """q [T, Hq, D] or [T, Hq*D], k likewise, positions [T] -> rotated (q, k), new tensors of the same shapes."""
    return (apply_rope_triton if use_triton(q) else apply_rope_ref)(q, k, positions, cos_sin_cache)
