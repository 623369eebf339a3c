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
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def paged_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window=None,
                        k_scales=None, v_scales=None):
    T, H, D = q.shape
    S = context_lens.shape[0]
    BS = k_cache.shape[1]
    ctx = context_lens.tolist()
    out = torch.empty_like(q)

    def kv(rows, L):  # K and V of the first L positions of block-table rows `rows`, as [..., KVH, L, D]
        ids = block_tables[rows, :-(-L // BS)]
        return _gather(k_cache, k_scales, ids, L, q.dtype), _gather(v_cache, v_scales, ids, L, q.dtype)

    if T == S == 1 and (sliding_window is None or ctx[0] <= sliding_window):
        # one decoding sequence that sees its whole context: no mask needed (the CPU batch-1 hot path)
        k, v = kv(0, ctx[0])
        out = F.scaled_dot_product_attention(q[0].unsqueeze(1), k, v, scale=scale, enable_gqa=H != k.shape[0])
        return out.view(1, H, D)
    if T == S:  # decode: every sequence has exactly one query, at position ctx - 1
        L = max(ctx)
        k, v = kv(slice(None), L)
        k_pos = torch.arange(L, device=q.device).expand(S, L)
        q_pos = (context_lens.to(q.device).long() - 1).unsqueeze(1)  # [S, 1]
        mask = attention_mask(q_pos, k_pos, sliding_window) & (k_pos < context_lens.to(q.device).unsqueeze(1)).unsqueeze(1)
        return _sdpa(q.unsqueeze(2), k, v, mask, scale).squeeze(2)
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
