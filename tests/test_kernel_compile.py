"""The KV-cache kernels compile for an H100 (sm_90) with no GPU present: Triton's interpreter (the
kernel tests) runs the kernels as Python and misses what only the compiler rejects (e.g. non-constexpr
globals, a constexpr-if `return` followed by more code, operand dtypes of tl.dot)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from lmconvert.kernels import kv_cache, paged_attention_triton as pa  # noqa: E402
from lmconvert.kernels._triton import INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this session (tests/kernels ran first)")


def compile_sm90(fn, types: dict, constexprs: dict, **options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = {n: types.get(n, "constexpr") for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except (RuntimeError, FileNotFoundError) as e:  # no CUDA backend / ptxas in this install
        if "CompilationError" in type(e).__name__:
            raise
        pytest.skip(f"cannot compile for CUDA here: {str(e).splitlines()[0][:120]}")


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_kv_kernels_compile_for_sm90(int8):
    kv = "*i8" if int8 else "*bf16"
    scales = "*fp16" if int8 else kv
    store = dict(k_ptr="*bf16", v_ptr="*bf16", kc_ptr=kv, vc_ptr=kv, ks_ptr=scales, vs_ptr=scales, slot_ptr="*i64",
                 stride_k="i32", stride_v="i32", KVH="i32", D="i32")
    compile_sm90(kv_cache._store_kv_kernel, store,
                 dict(BLOCK_D=128, KV_INT8=int8, STEP=kv_cache.STEP, MIN_SCALE=kv_cache.MIN_SCALE), num_warps=1)
    attn = dict(q_ptr="*bf16", k_ptr=kv, v_ptr=kv, ks_ptr=scales, vs_ptr=scales, bt_ptr="*i32", ctx_ptr="*i32",
                cu_ptr="*i32", out_ptr="*bf16", part_o_ptr="*fp32", part_lse_ptr="*fp32", stride_qt="i32",
                stride_qh="i32", stride_bt="i32", qk_scale="fp32", WINDOW="i32", QG="i32", H="i32", D="i32")
    shape = dict(KVH=8, BLOCK_D=128, UPCAST=False, KV_INT8=int8)
    compile_sm90(pa._decode_kernel, attn, dict(shape, BS=16, BLOCK_N=pa.decode_tile(16, int8), BLOCK_G=16, NUM_SPLITS=8),
                 num_warps=4)
    compile_sm90(pa._prefill_kernel, attn, dict(shape, BS=32, BLOCK_N=32, BLOCK_M=64), num_warps=4, num_stages=2)
