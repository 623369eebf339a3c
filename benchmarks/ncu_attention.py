"""Paged decode attention (Qwen3-8B heads, batch 64 x 4096 tokens) with bf16 and int8 KV, a few launches each,
for a profiler to look at:

    ncu --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 2 --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy python benchmarks/ncu_attention.py
"""

import torch

from lmconvert.kernels import kv_cache
from lmconvert.kernels.paged_attention_triton import paged_attention_triton


def main(S=64, ctx_len=4096, H=32, KVH=8, D=128, bs=16, launches=4):
    q = torch.randn(S, H, D, device="cuda", dtype=torch.bfloat16)
    nb = ctx_len // bs
    bt = torch.randperm(S * nb, device="cuda").int().view(S, nb)
    cache = torch.randn(S * nb, bs, KVH, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(S + 1, device="cuda", dtype=torch.int32)
    ctx = torch.full((S,), ctx_len, device="cuda", dtype=torch.int32)
    codes, scales = kv_cache.quantize_kv_ref(cache)
    for _ in range(launches):  # bf16 KV first, then int8 KV (ncu numbers the launches in this order)
        paged_attention_triton(q, cache, cache, bt, cu, ctx, D**-0.5)
    for _ in range(launches):
        paged_attention_triton(q, codes, codes, bt, cu, ctx, D**-0.5, k_scales=scales, v_scales=scales)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
