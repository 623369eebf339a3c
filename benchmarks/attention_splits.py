"""Paged decode attention (Qwen3-8B heads, block 16): time against the number of KV splits, bf16 and int8 KV.
With one split a sequence's KV head is one program; more splits add programs (and a merge) so that fewer
resident programs per SM still fill the GPU.

    python benchmarks/attention_splits.py                       # 64 x 4096 tokens, bf16 and int8 KV
    python benchmarks/attention_splits.py --batch 1 --ctx 768,2048,8192 --splits 1,4,8,16,32,64 --bf16-only

--width: block-table columns (the decode graphs capture session_len / block_size; default: just the context).
"""

import argparse

import torch
import triton.testing

from lmconvert.kernels import kv_cache, paged_attention_triton as pat

H, KVH, D, BS = 32, 8, 128, 16


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def sweep(batch: int, ctx_len: int, splits_list: list[int], width: int, bf16_only: bool) -> None:
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    nb = -(-ctx_len // BS)
    width = max(width, nb)
    bt = torch.randperm(batch * width, device="cuda").int().view(batch, width)
    kc = torch.randn(batch * width, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    ctx = torch.full((batch,), ctx_len, device="cuda", dtype=torch.int32)
    kinds = [("bf16", kc, vc, {})]
    if not bf16_only:
        (kq, ks), (vq, vs) = kv_cache.quantize_kv_ref(kc), kv_cache.quantize_kv_ref(vc)
        kinds.append(("int8", kq, vq, dict(k_scales=ks, v_scales=vs)))
    default = pat.num_kv_splits(batch, KVH, width, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"batch {batch} x {ctx_len} tokens, table width {width}: the runtime picks {default} splits", flush=True)
    base = None
    for splits in splits_list:
        for name, k, v, extra in kinds:
            fn = lambda: pat.paged_attention_triton(q, k, v, bt, cu, ctx, D**-0.5, num_splits=splits, **extra)
            us = triton.testing.do_bench_cudagraph(fn) * 1e3
            base = base or us
            print(f"  {name} splits {splits}: {us:.1f} us, {base / us:.2f}x the first", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=ints, default=[4096])
    p.add_argument("--splits", type=ints, default=[1, 2, 4, 8])
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--bf16-only", action="store_true")
    a = p.parse_args()
    for ctx_len in a.ctx:
        sweep(a.batch, ctx_len, a.splits, a.width, a.bf16_only)


if __name__ == "__main__":
    main()
