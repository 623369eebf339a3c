"""Plain-torch paged attention: the reference for the Triton kernels and the runtime's CPU path.

Gathers each sequence's blocks into contiguous K/V and calls torch SDPA (fp32 softmax inside) with an
explicit causal / sliding-window mask. A pure decode batch (one query per sequence) runs as one batched
SDPA over keys padded to the longest context. int8 caches: only the gathered blocks are dequantized.
"""

import torch
import torch.nn.functional as F

from .kv_cache import dequantize_kv


def attention_mask(q_pos, k_pos, sliding_window):
    """bool [..., Lq, Lk]: causal, and HF Mistral's window (keys at positions > p - window)."""
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if sliding_window is not None:
        mask &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - sliding_window
    return mask


def _gather(cache, scales, block_ids, length, dtype):
    """cache [NB, BS, KVH, D], block_ids [..., nb] -> [..., KVH, length, D] (SDPA's layout) in dtype;
    an int8 cache is dequantized with its (scale, zero) pool."""
    ids = block_ids.long()
    kv = cache[ids] if scales is None else dequantize_kv(cache[ids], scales[ids], dtype)  # [..., nb, BS, KVH, D]
    kv = kv.flatten(-4, -3)[..., :length, :, :]
    return kv.transpose(-3, -2)


def _sdpa(q, k, v, mask, scale):
    # q [..., H, Lq, D]; enable_gqa lets each KV head serve its query group without a repeat
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(-3), scale=scale,
                                          enable_gqa=bool(q.shape[-3] != k.shape[-3]))


def decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                         k_scales=None, v_scales=None):
    """One query per sequence, at position context_lens - 1, over every block its table row lists (keys past
    its context masked). Tensor ops only, no host reads: torch.compile traces it whole (the CPU decode step)."""
    S, H, D = q.shape
    L = block_tables.shape[1] * k_cache.shape[1]
    k, v = (_gather(c, sc, block_tables, L, q.dtype) for c, sc in ((k_cache, k_scales), (v_cache, v_scales)))
    lens = context_lens.to(q.device).long().unsqueeze(1)  # [S, 1]
    if S == 1 and sliding_window is None and not torch.compiler.is_compiling():
        # batch-1 eager: the context as it is, no mask (SDPA's fastest CPU path)
        n = int(lens)
        return F.scaled_dot_product_attention(q.transpose(0, 1), k[0, :, :n], v[0, :, :n], scale=scale,
                                              enable_gqa=H != k.shape[1]).view(1, H, D)
    k_pos = torch.arange(L, device=q.device).expand(S, L)
    mask = attention_mask(lens - 1, k_pos, sliding_window) & (k_pos < lens).unsqueeze(1)  # [S, 1, L]
    if not torch.compiler.is_compiling():
        return _sdpa(q.unsqueeze(2), k, v, mask, scale).squeeze(2)
    # compiled: the math spelled out (fp32 softmax, as SDPA's), which inductor fuses around two small batched
    # matmuls; CPU SDPA's flash kernel costs ~60 us a call at one query, more than the work
    KVH = k.shape[1]
    scores = torch.matmul(q.view(S, KVH, H // KVH, D).float(), k.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1)  # [S, KVH, H/KVH, L]
    return torch.matmul(probs, v.float()).to(q.dtype).view(S, H, D)


def paged_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window=None,
                        k_scales=None, v_scales=None):
    T, H, D = q.shape
    S = context_lens.shape[0]
    BS = k_cache.shape[1]
    out = torch.empty_like(q)

    def kv(rows, L):  # K and V of the first L positions of block-table rows `rows`, as [..., KVH, L, D]
        ids = block_tables[rows, :-(-L // BS)]
        return _gather(k_cache, k_scales, ids, L, q.dtype), _gather(v_cache, v_scales, ids, L, q.dtype)

    if T == S:  # decode: every sequence has exactly one query, at position ctx - 1
        return decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                    k_scales, v_scales)
    ctx = context_lens.tolist()
    cu = cu_seqlens_q.tolist()
    for s in range(S):
        q_s = q[cu[s]:cu[s + 1]]
        Lq, L = q_s.shape[0], ctx[s]
        if Lq == 0:
            continue
        k, v = kv(s, L)
        k_pos = torch.arange(L, device=q.device)
        q_pos = torch.arange(L - Lq, L, device=q.device)
        mask = attention_mask(q_pos, k_pos, sliding_window)
        out[cu[s]:cu[s + 1]] = _sdpa(q_s.transpose(0, 1), k, v, mask, scale).transpose(0, 1)
    return out
