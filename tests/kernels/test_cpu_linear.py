"""CPU packed W4 / W8 matmuls (ATen's int4 / int8 weight-only kernels, cpu_linear.py) vs the torch reference.

The packed kernels compute the same dequantized weight ((q - z) * s, as (q - 8) * s + offset) but accumulate in
their own order: relative error vs the reference within 1e-2 in bf16 (both round to bf16), 1e-5 in fp32.
"""

import pytest
import torch

from lmconvert.kernels import cpu_linear, quant_linear as ql
from lmconvert.quant.primitives import quantize_w4, quantize_w8

from kernel_testing import rel_err

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


@pytest.mark.parametrize("M", [1, 5, 70])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w4_packed_matches_reference(M, G, dtype):
    K, N = 384, 208
    w, x, bias = torch.randn(N, K), torch.randn(2, M, K, dtype=dtype), torch.randn(N, dtype=dtype)
    qw, s, z = quantize_w4(w, G, dtype=dtype)
    packed, offsets, none = ql.prepare_w4(qw, s, z, G)
    assert cpu_linear.is_packed_w4(packed) and packed.shape == (N, K // 2) and none is None
    out = ql.w4a16_linear(x, packed, offsets, None, G, bias)
    assert out.shape == (2, M, N) and out.dtype == dtype
    assert rel_err(out, ql.w4a16_linear_ref(x, qw, s, z, G, bias)) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 5, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w8_packed_matches_reference(M, dtype):
    K, N = 384, 200  # int8 takes any N
    w, x = torch.randn(N, K), torch.randn(M, K, dtype=dtype)
    qw, s = quantize_w8(w, None, dtype=dtype)
    packed, scales = ql.prepare_w8(qw, s, K)
    assert cpu_linear.is_packed_w8(scales) and packed.shape == (N, K)
    out = ql.w8a16_linear(x, packed, scales, K)
    assert out.dtype == dtype and rel_err(out, ql.w8a16_linear_ref(x, qw, s, K)) < TOL[dtype]


@pytest.mark.parametrize("K, N, G, packable", [(384, 200, 32, False), (384, 208, 16, False), (48, 64, 16, False),
                                               (80, 64, 16, False), (64, 64, 32, True), (576, 1536, 64, True)])
def test_w4_shapes_aten_refuses_keep_the_engine_layout(K, N, G, packable):
    assert cpu_linear.w4_packable(K, N, G) == packable


def test_w8_grouped_or_odd_k_keeps_the_engine_layout():
    """ATen's int8 kernel has one scale per output row, and rounds wrongly (or crashes) for K not a multiple of 32."""
    qw, s = quantize_w8(torch.randn(64, 128), 32, dtype=torch.float32)
    assert ql.prepare_w8(qw, s, 32)[0].shape == (128, 64)
    qw, s = quantize_w8(torch.randn(64, 40), None, dtype=torch.float32)
    assert ql.prepare_w8(qw, s, 40)[0].shape == (40, 64)


def test_streamed_gemv_in_a_compiled_step_matches_linear():
    """A compiled batch-1 fp linear as inductor's fused reduction: F.linear's result within bf16 rounding; eager
    (not compiling) keeps F.linear itself."""
    from lmconvert.runtime.layers import Linear

    head = Linear()
    head.load({"weight": torch.randn(4096, 64, dtype=torch.bfloat16)})
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, head.weight)
    assert torch.equal(head(x), ref) and not cpu_linear.streams_as_reduction(x)
    out = torch.compile(head, dynamic=False)(x)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < TOL[torch.bfloat16]
