"""Plain-torch paged attention: the reference for the Triton kernels and the runtime's CPU path.

Gathers each sequence's blocks into contiguous K/V and calls torch SDPA (fp32 softmax inside) with an
explicit causal / sliding-window mask. A pure decode batch (one query per sequence) runs as one batched
SDPA over keys padded to the longest context.
"""

import torch
import torch.nn.functional as F


def attention_mask(q_pos, k_pos, sliding_window):
    """bool [..., Lq, Lk]: causal, and HF Mistral's window (keys at positions > p - window)."""
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if sliding_window is not None:
        mask &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - sliding_window
    return mask


def _gather(cache, block_ids, length):
    """cache [NB, BS, KVH, D], block_ids [..., nb] -> [..., KVH, length, D] (SDPA's layout)."""
    kv = cache[block_ids.long()]  # [..., nb, BS, KVH, D]
    kv = kv.flatten(-4, -3)[..., :length, :, :]
    return kv.transpose(-3, -2)


def _sdpa(q, k, v, mask, scale):
    # q [..., H, Lq, D]; enable_gqa lets each KV head serve its query group without a repeat
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(-3), scale=scale,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def paged_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window=None):
    T, H, D = q.shape
    S = context_lens.shape[0]
    BS = k_cache.shape[1]
    ctx = context_lens.tolist()
    out = torch.empty_like(q)
    if T == S == 1 and (sliding_window is None or ctx[0] <= sliding_window):
        # one decoding sequence that sees its whole context: no mask needed (the CPU batch-1 hot path)
        L = ctx[0]
        k, v = _gather(k_cache, block_tables[0, :-(-L // BS)], L), _gather(v_cache, block_tables[0, :-(-L // BS)], L)
        out = F.scaled_dot_product_attention(q[0].unsqueeze(1), k, v, scale=scale, enable_gqa=H != k.shape[0])
        return out.view(1, H, D)
    if T == S:  # decode: every sequence has exactly one query, at position ctx - 1
        L = max(ctx)
        nb = -(-L // BS)
        k, v = _gather(k_cache, block_tables[:, :nb], L), _gather(v_cache, block_tables[:, :nb], L)
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
        nb = -(-L // BS)
        k, v = _gather(k_cache, block_tables[s, :nb], L), _gather(v_cache, block_tables[s, :nb], L)
        k_pos = torch.arange(L, device=q.device)
        q_pos = torch.arange(L - Lq, L, device=q.device)
        mask = attention_mask(q_pos, k_pos, sliding_window)
        out[cu[s]:cu[s + 1]] = _sdpa(q_s.transpose(0, 1), k, v, mask, scale).transpose(0, 1)
    return out
