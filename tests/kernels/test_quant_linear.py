"""W4A16 / W8A16: Triton (interpreted) vs the torch reference vs an fp64 dequant from quant/primitives.py.

Tolerances (relative Frobenius error): Triton vs reference 1e-2 in bf16 / 3e-3 in fp16 — both round the
dequantized weight to the activation dtype but accumulate in a different order; reference vs fp64 1e-2.
"""

import pytest
import torch

from lmconvert.kernels import quant_linear as ql
from lmconvert.kernels.autotune import Autotuner
from lmconvert.quant.primitives import dequantize_w4, dequantize_w8, quantize_w4, quantize_w8

from kernel_testing import rel_err

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def _case(M, G, dtype, lead=()):
    K, N = 3 * G, 96  # odd multiples of the group / of 32, so edge tiles are masked
    w = torch.randn(N, K)
    x = torch.randn(*lead, M, K, dtype=dtype)
    return x, w, torch.randn(N, dtype=dtype)


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_matches_reference(M, G, dtype):
    x, w, bias = _case(M, G, dtype)
    qw, s, z = quantize_w4(w, G, dtype=dtype)
    exact = x.double() @ dequantize_w4(qw, s, z, G).double() + bias.double()
    ref = ql.w4a16_linear_ref(x, qw, s, z, G, bias)
    assert rel_err(ref, exact) < 1e-2
    assert rel_err(ql.w4a16_linear_triton(x, qw, s, z, G, bias), ref) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("G", [32, 128])
def test_w8a16_matches_reference(M, G):
    x, w, _ = _case(M, G, torch.bfloat16)
    qw, s = quantize_w8(w, G, dtype=torch.bfloat16)
    exact = x.double() @ dequantize_w8(qw, s, G).double()
    ref = ql.w8a16_linear_ref(x, qw, s, G)
    assert rel_err(ref, exact) < 1e-2
    assert rel_err(ql.w8a16_linear_triton(x, qw, s, G), ref) < TOL[torch.bfloat16]


def test_w8a16_per_channel_and_leading_dims():
    x, w, bias = _case(3, 64, torch.float16, lead=(2,))
    qw, s = quantize_w8(w, None, dtype=torch.float16)  # G = K
    K = x.shape[-1]
    out = ql.w8a16_linear_triton(x, qw, s, K, bias)
    assert out.shape == (2, 3, 96)
    assert rel_err(out, ql.w8a16_linear_ref(x, qw, s, K, bias)) < TOL[torch.float16]


def test_reference_dequant_equals_primitives():
    qw, s, z = quantize_w4(torch.randn(64, 256), 64, dtype=torch.bfloat16)
    assert torch.equal(ql._dequant_w4_ref(qw, s, z, 64), dequantize_w4(qw, s, z, 64))


def test_public_functions_take_reference_on_cpu():
    x, w, bias = _case(2, 32, torch.bfloat16)
    qw, s, z = ql.prepare_w4(*quantize_w4(w, 32, dtype=torch.bfloat16), 32)
    assert torch.equal(ql.w4a16_linear(x, qw, s, z, 32, bias), ql.w4a16_linear_ref(x, qw, s, z, 32, bias))


def test_regime_selection_and_candidates():
    assert [ql.select_regime(m) for m in (1, 16, 17, 2048)] == ["decode", "decode", "prefill", "prefill"]
    cpu = torch.device("cpu")
    for G in (32, 64, 128):
        for bn, bk, split, _ in ql.decode_candidates(1, 4096, 4096, G, cpu):
            assert G % bk == 0 and 1 <= split <= 4096 // bk
            assert -(-4096 // bn) * split >= 2 * 4 or split == 4096 // bk  # fills 2x the (4 fake) SMs
        assert all(G % c[2] == 0 for c in ql.prefill_candidates(64, 4096, 4096, G, cpu))


def test_autotuner_caches_choice_per_key():
    tuner, calls = Autotuner(), []
    assert tuner.pick("k", ["a", "b"], calls.append) == "a"
    assert tuner.pick("k", ["b"], calls.append) == "a"  # cached: not re-timed, not re-chosen
    assert tuner.pick("k2", ["b"], calls.append) == "b"
    ql._tuner.chosen.clear()
    x, w, _ = _case(1, 32, torch.bfloat16)
    ql.w4a16_linear_triton(x, *quantize_w4(w, 32, dtype=torch.bfloat16), 32)
    assert [k[:2] for k in ql._tuner.chosen] == [("decode", 1)]
