"""Paged decode attention at 64 x 4096 tokens (Qwen3-8B heads, block 16): time against the number of KV splits,
bf16 and int8 KV. With one split a sequence's KV head is one program (512 programs); more splits add programs
(and a merge) so that fewer resident programs per SM still fill the GPU.

    python benchmarks/attention_splits.py
"""

import torch
import triton.testing

from lmconvert.kernels import kv_cache, paged_attention_triton as pat

S, CTX, H, KVH, D, BS = 64, 4096, 32, 8, 128, 16


def main():
    q = torch.randn(S, H, D, device="cuda", dtype=torch.bfloat16)
    nb = CTX // BS
    bt = torch.randperm(S * nb, device="cuda").int().view(S, nb)
    kc = torch.randn(S * nb, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    cu = torch.arange(S + 1, device="cuda", dtype=torch.int32)
    ctx = torch.full((S,), CTX, device="cuda", dtype=torch.int32)
    (kq, ks), (vq, vs) = kv_cache.quantize_kv_ref(kc), kv_cache.quantize_kv_ref(vc)
    base = None
    for splits in (1, 2, 4, 8):
        for name, args in (("bf16", dict()), ("int8", dict(k_scales=ks, v_scales=vs))):
            k, v = (kq, vq) if name == "int8" else (kc, vc)
            for keys, warps in ((None, None), (32, 4), (64, 8)) if name == "int8" else ((None, None),):
                fn = lambda: pat.paged_attention_triton(q, k, v, bt, cu, ctx, D**-0.5, num_splits=splits,
                                                        decode_keys=keys, decode_warps=warps, **args)
                us = triton.testing.do_bench_cudagraph(fn) * 1e3
                if base is None:
                    base = us
                print(f"{name} splits {splits} keys {keys} warps {warps}: {us:.1f} us, {base / us:.2f}x bf16 1-split",
                      flush=True)


if __name__ == "__main__":
    main()
