"""paged_attention: the single entry point for decode and (chunked / prefix-cached) prefill."""

from .paged_attention_ref import paged_attention_ref
from ._triton import use_triton


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window=None,
                    k_scales=None, v_scales=None, max_seqlen_q=None, decode_rows=0):
    """q [T, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables int [S, max_blocks];
    cu_seqlens_q int [S+1]; context_lens int [S] (cached prefix + new tokens, already stored).
    Sequence s's queries are its last cu_seqlens_q[s+1]-cu_seqlens_q[s] tokens. Returns [T, H, D].
    int8 caches come with their fp16 (scale, zero) pools [num_blocks, block_size, KVH, 2] (kv_cache.py).
    Host-side hints for the GPU path (the reference needs none): max_seqlen_q (else read from cu_seqlens_q,
    a device sync), decode_rows (the leading sequences with one query, run by the decode kernel)."""
    if use_triton(q):
        from .paged_attention_triton import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                      sliding_window, max_seqlen_q=max_seqlen_q, k_scales=k_scales, v_scales=v_scales,
                                      decode_rows=decode_rows)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window,
                               k_scales, v_scales)
