"""store_kv: write this step's k/v rows into the paged caches at their slots (slot = block * block_size + offset).

A slot of -1 means "don't store" (padding rows, e.g. under CUDA-graph batch padding).
"""


from ._triton import next_pow2, tl, triton, use_triton


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    slots = slot_mapping.long()
    k_rows = k.reshape(k.shape[0], *k_cache.shape[2:])
    v_rows = v.reshape(v.shape[0], *v_cache.shape[2:])
    if bool((slots < 0).any()):  # padding rows (CUDA-graph batches): drop them; plain CPU steps have none
        keep = slots >= 0
        slots, k_rows, v_rows = slots[keep], k_rows[keep], v_rows[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k_rows.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v_rows.to(v_cache.dtype))


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v, ROW: tl.constexpr,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        for start in range(0, ROW, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < ROW
            k = tl.load(k_ptr + t * stride_k + cols, mask=mask)
            v = tl.load(v_ptr + t * stride_v + cols, mask=mask)
            tl.store(kc_ptr + slot * ROW + cols, k.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + slot * ROW + cols, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    T = k.shape[0]
    row = k_cache.shape[2] * k_cache.shape[3]
    k2, v2 = k.reshape(T, row), v.reshape(T, row)  # views when k/v are column slices of the qkv output
    assert k2.stride(-1) == 1 and v2.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if T:
        _store_kv_kernel[(T,)](k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0),
                               ROW=row, BLOCK=min(1024, next_pow2(row)), num_warps=4)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, KVH, D] (or [T, KVH*D]); caches [num_blocks, block_size, KVH, D]; slot_mapping int [T]."""
    (store_kv_triton if use_triton(k) else store_kv_ref)(k, v, k_cache, v_cache, slot_mapping)
