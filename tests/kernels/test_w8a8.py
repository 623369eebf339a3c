"""W8A8: per-token int8 quantization and the int8 GEMM, Triton (interpreted) vs the torch references.

Both sides compute the same integers (int32 accumulation is exact, the reference's fp32/fp64 sums too) and
the same fp32 epilogue in the same order, so under the interpreter they agree exactly: tolerance 0
(torch.equal) for fp32 outputs. bf16 outputs: within one bf16 step (2^-7 relative), since the interpreter
(Triton 3.9) truncates fp32 -> bf16 where torch rounds to nearest. The references themselves are checked against fp64 math: the quantizer round-trips within
half a step, the GEMM matches fp64 products of the dequantized operands to 1e-6 relative.
"""

import pytest
import torch

from lmconvert.kernels import autotune, int8_linear as wl
from lmconvert.quant.primitives import quantize_w8

from kernel_testing import LaunchingTuner, rel_err


def _weights(N, K, dtype):
    qweight, scales = quantize_w8(torch.randn(N, K), None, dtype=dtype)
    return qweight, scales


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("K", [48, 200, 5000])  # 5000: more than one 4096-wide chunk per row
def test_quantize_per_token_matches_reference(M, K):
    x = torch.randn(M, K) * torch.logspace(-2, 2, M).unsqueeze(1)
    x[0, :7] = 0.0
    q, scale = wl.quantize_per_token_triton(x)
    q_ref, scale_ref = wl.quantize_per_token_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q_ref.abs().max() == 127
    assert ((q_ref.double() * scale_ref.double()[:, None] - x.double()).abs() <= 0.5 * scale_ref.double()[:, None] + 1e-7).all()


def test_quantize_all_zero_row():
    q, scale = wl.quantize_per_token_triton(torch.zeros(2, 64, dtype=torch.bfloat16))
    assert torch.equal(q, torch.zeros(2, 64, dtype=torch.int8)) and (scale > 0).all()


def assert_same(out, ref):
    """Exact in fp32; one bf16 step in bf16 (see the module docstring)."""
    assert out.dtype == ref.dtype
    if out.dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()


def _each_config(a, a_scale, b, w_scale, bias, dtype):
    _, cands, run = wl.plan(a, a_scale, b, w_scale, bias, dtype)
    return {cfg: run(cfg) for cfg in cands}


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("N,K", [(80, 48), (112, 208), (48, 2200)])  # masked K tails; 3 reference K-slices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_gemm_matches_reference(M, N, K, dtype):
    a, a_scale = wl.quantize_per_token_ref(torch.randn(M, K))
    b, w_scale = _weights(N, K, dtype)
    bias = torch.randn(N, dtype=dtype)
    ref = wl.int8_gemm_ref(a, a_scale, b, w_scale, bias, dtype)
    exact = (a.double() * a_scale.double()[:, None]) @ (b.double() * w_scale.double()) + bias.double()
    assert rel_err(wl.int8_gemm_ref(a, a_scale, b, w_scale, bias, torch.float32), exact) < 1e-6
    for cfg, out in _each_config(a, a_scale, b, w_scale, bias, dtype).items():
        assert_same(out, ref)


@pytest.mark.parametrize("M", [1, 33])
def test_int8_gemm_k_contiguous_weights(M):
    """prepare_w8a8's CUDA layout: the same [K, N] tensor stored transposed (strides (1, K))."""
    a, a_scale = wl.quantize_per_token_ref(torch.randn(M, 96))
    b, w_scale = _weights(64, 96, torch.bfloat16)
    b_kmajor = b.t().contiguous().t()
    assert b_kmajor.stride() == (1, 96)
    out = wl.int8_gemm_triton(a, a_scale, b_kmajor, w_scale, None, torch.bfloat16)
    assert_same(out, wl.int8_gemm_ref(a, a_scale, b, w_scale, None, torch.bfloat16))


def test_w8a8_linear_leading_dims_and_empty():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    b, w_scale = _weights(32, 64, torch.bfloat16)
    out = wl.w8a8_linear_triton(x, b, w_scale)
    assert out.shape == (2, 3, 32)
    assert_same(out, wl.w8a8_linear_ref(x, b, w_scale))
    assert wl.w8a8_linear_triton(x[:0], b, w_scale).shape == (0, 3, 32)
    # close to the fp product: int8 on both sides costs ~1% here
    assert rel_err(wl.w8a8_linear_ref(x.float(), b, w_scale), x.float() @ (b.float() * w_scale.float())) < 2e-2


def test_int8_gemm_tuning_launches_over_cold_copies(monkeypatch):
    """The CUDA-only timing path under the interpreter: candidates run over copies of the weights (strides
    kept: the k-contiguous layout), then the pick runs on the weights themselves."""
    a, a_scale = wl.quantize_per_token_ref(torch.randn(3, 96))
    b, w_scale = _weights(64, 96, torch.bfloat16)
    b_kmajor = b.t().contiguous().t()
    monkeypatch.setattr(autotune, "l2_bytes", lambda device: b.nbytes + w_scale.nbytes)
    monkeypatch.setattr(wl, "_tuner", LaunchingTuner())
    out = wl.int8_gemm_triton(a, a_scale, b_kmajor, w_scale, None, torch.bfloat16)
    assert wl._tuner.launched > 1
    assert_same(out, wl.int8_gemm_ref(a, a_scale, b, w_scale, None, torch.bfloat16))
