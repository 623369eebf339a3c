"""W4A16 / W8A16: Triton (interpreted) vs the torch reference vs an fp64 dequant from quant/src/primitives.py.

Tolerances (relative Frobenius error): Triton vs reference 1e-2 in bf16 / 3e-3 in fp16 — both round the
dequantized weight to the activation dtype but accumulate in a different order; reference vs fp64 1e-2.
"""

import pytest
import torch

from lmconvert.kernels import pending, quant_linear as ql
from lmconvert.kernels import autotune
from lmconvert.kernels.autotune import Autotuner, cold_copies
from lmconvert.quant.primitives import dequantize_w4, dequantize_w8, quantize_w4, quantize_w8

from kernel_testing import LaunchingTuner, rel_err

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def _case(M, G, dtype, lead=(), K=None):
    K, N = K or 128 * 3, 96  # N not a multiple of the block, so edge tiles are masked
    w = torch.randn(N, K)
    x = torch.randn(*lead, M, K, dtype=dtype)
    return x, w, torch.randn(N, dtype=dtype)


def _each_config(x, qw, s, z, G, bias, bits):
    """Every candidate design/config of the autotuner on this input (the tuner itself takes the first)."""
    packed = ql._pack_w4(qw, G) if bits == 4 else ql._pack_w8(qw, G)
    _, cands, run = ql.plan(x.reshape(-1, x.shape[-1]), packed, s, z, bias, G, bits)
    picked = {c[:2]: c for c in cands}  # one per design and block width: the one splitting K most
    return {cfg: run(cfg).view(*x.shape[:-1], -1) for cfg in picked.values()}


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_matches_reference(M, G, dtype):
    x, w, bias = _case(M, G, dtype)
    qw, s, z = quantize_w4(w, G, dtype=dtype)
    exact = x.double() @ dequantize_w4(qw, s, z, G).double() + bias.double()
    ref = ql.w4a16_linear_ref(x, qw, s, z, G, bias)
    assert rel_err(ref, exact) < 1e-2
    for cfg, out in _each_config(x, qw, s, z, G, bias, 4).items():
        assert rel_err(out, ref) < TOL[dtype], cfg


@pytest.mark.parametrize("G", [128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swapped_w4_whole_groups(G, dtype):
    """swapped (W4, M <= 16): exact (q - z) operands scaled once a block, two blocks a group at G = 256, rows
    past M masked, K split over programs; the deferred sums finished by the next kernel (here take)."""
    x, w, bias = _case(5, G, dtype, K=768)
    qw, s, z = quantize_w4(w, G, dtype=dtype)
    ref = ql.w4a16_linear_ref(x, qw, s, z, G, bias)
    _, cands, run = ql.plan(x, ql._pack_w4(qw, G), s, z, bias, G, 4)
    swapped = [c for c in cands if c[0] == "swapped"]
    assert swapped and ql._split(swapped[0], 5, 96, 6, x.device)[1] > 1
    for cfg in swapped:
        assert rel_err(run(cfg), ref) < TOL[dtype], cfg
        assert rel_err(pending.take(run(cfg, defer=True)), ref) < TOL[dtype], cfg


@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_multi_block_steps_ragged_splits(bits):
    """gemv: BB blocks a step, several steps a program, and a last split with masked blocks; hand prefetch
    (stages 0) and Triton's pipeline."""
    x, w, bias = _case(1, 128, torch.bfloat16, K=640)  # 5 (W4) / 10 (W8) blocks of P*R k
    if bits == 4:
        qw, s, z = quantize_w4(w, 128, dtype=torch.bfloat16)
        packed, ref = ql._pack_w4(qw, 128), ql.w4a16_linear_ref(x, qw, s, z, 128, bias)
    else:
        (qw, s), z = quantize_w8(w, 128, dtype=torch.bfloat16), None
        packed, ref = ql._pack_w8(qw, 128), ql.w8a16_linear_ref(x, qw, s, 128, bias)
    _, _, run = ql.plan(x, packed, s, z, bias, 128, bits)
    for cfg in ((32, 2, 4, 0), (64, 4, 4, 0), (32, 1, 3, 0), (64, 4, 16, 0), (32, 1, 3, 3), (64, 2, 4, 4)):
        assert rel_err(run(("gemv", *cfg[:3], 4, cfg[3])), ref) < TOL[torch.bfloat16], cfg


@pytest.mark.parametrize("M", [1, 5])
def test_w4a16_narrow_blocks(M):
    """K / 8 not a multiple of 16 (SmolLM2's 576): R < 16, GEMV for M = 1, dequant + matmul otherwise."""
    x, w, bias = _case(M, 64, torch.bfloat16, K=576)
    qw, s, z = quantize_w4(w, 64, dtype=torch.bfloat16)
    assert ql._pack_w4(qw, 64).shape[1] == 8
    ref = ql.w4a16_linear_ref(x, qw, s, z, 64, bias)
    assert rel_err(ql.w4a16_linear_triton(x, qw, s, z, 64, bias), ref) < TOL[torch.bfloat16]


def test_prepared_layouts_round_trip():
    qw, s, z = quantize_w4(torch.randn(64, 256), 32, dtype=torch.bfloat16)
    packed = ql._pack_w4(qw, 32)
    assert packed.shape == (2, 16, 64) and torch.equal(ql._w4_codes(packed), ql._w4_codes(qw))
    assert torch.equal(ql._dequant_w4_ref(packed, s, z, 32), dequantize_w4(qw, s, z, 32))
    q8, s8 = quantize_w8(torch.randn(64, 256), 64, dtype=torch.bfloat16)
    assert torch.equal(ql._dequant_w8_ref(ql._pack_w8(q8, 64), s8, 64), dequantize_w8(q8, s8, 64))


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("G", [32, 128])
def test_w8a16_matches_reference(M, G):
    x, w, _ = _case(M, G, torch.bfloat16)
    qw, s = quantize_w8(w, G, dtype=torch.bfloat16)
    exact = x.double() @ dequantize_w8(qw, s, G).double()
    ref = ql.w8a16_linear_ref(x, qw, s, G)
    assert rel_err(ref, exact) < 1e-2
    for cfg, out in _each_config(x, qw, s, None, G, None, 8).items():
        assert rel_err(out, ref) < TOL[torch.bfloat16], cfg


@pytest.mark.parametrize("M", [1, 3])
def test_w8a16_per_channel_and_leading_dims(M):
    x, w, bias = _case(M, 64, torch.float16, lead=(2,), K=192)
    qw, s = quantize_w8(w, None, dtype=torch.float16)  # G = K
    K = x.shape[-1]
    out = ql.w8a16_linear_triton(x, qw, s, K, bias)
    assert out.shape == (2, M, 96)
    assert rel_err(out, ql.w8a16_linear_ref(x, qw, s, K, bias)) < TOL[torch.float16]


def test_reference_dequant_equals_primitives():
    qw, s, z = quantize_w4(torch.randn(64, 256), 64, dtype=torch.bfloat16)
    assert torch.equal(ql._dequant_w4_ref(qw, s, z, 64), dequantize_w4(qw, s, z, 64))


def test_public_functions_take_reference_on_cpu_where_aten_cannot():
    """N = 96 (not a multiple of 16 is what ATen's int4 pack refuses; 96 is fine) with G = 16: no ATen kernel."""
    x, w, bias = _case(2, 16, torch.bfloat16)
    qw, s, z = ql.prepare_w4(*quantize_w4(w, 16, dtype=torch.bfloat16), 16)
    assert qw.dtype == torch.int32  # the engine layout, kept
    assert torch.equal(ql.w4a16_linear(x, qw, s, z, 16, bias), ql.w4a16_linear_ref(x, qw, s, z, 16, bias))


def test_regime_selection_and_candidates():
    assert [ql.select_regime(m) for m in (1, 16, 17, 64, 65)] == ["decode", "decode", "mid", "mid", "prefill"]
    cpu = torch.device("cpu")
    assert {c[0] for c in ql.candidates(1, 4096, 4096, 16, cpu)} == {"fused"}  # groups < block
    assert {c[0] for c in ql.candidates(1, 4096, 4096, 16, cpu, whole=True)} == {"gemv", "fused"}
    assert {c[0] for c in ql.candidates(16, 4096, 4096, 16, cpu, whole=True)} == {"fused", "swapped"}
    assert {c[0] for c in ql.candidates(16, 4096, 4096, 16, cpu, whole=True, bits=8)} == {"fused"}
    assert {c[0] for c in ql.candidates(16, 4096, 4096, 16, cpu)} == {"fused"}  # swapped: W4, whole groups
    assert {c[0] for c in ql.candidates(33, 4096, 4096, 16, cpu)} == {"fused", "dequant"}
    assert {c[0] for c in ql.candidates(16, 4096, 4096, 8, cpu)} == {"dequant"}  # R < 16: no tl.dot
    assert {c[0] for c in ql.candidates(2048, 4096, 4096, 16, cpu)} == {"dequant"}
    for cfg in ql.candidates(1, 4096, 4096, 16, cpu) + ql.candidates(1, 4096, 4096, 16, cpu, whole=True):
        per, split = ql._split(cfg, 1, 4096, 32, cpu)
        assert (split - 1) * per < 32 <= split * per  # every K block covered once, no empty program


def test_autotuner_caches_choice_per_key():
    tuner, calls = Autotuner(), []
    assert tuner.pick("k", ["a", "b"], calls.append) == "a"
    assert tuner.pick("k", ["b"], calls.append) == "a"  # cached: not re-timed, not re-chosen
    assert tuner.pick("k2", ["b"], calls.append) == "b"
    ql._tuner.chosen.clear()
    x, w, _ = _case(1, 32, torch.bfloat16)
    q = quantize_w4(w, 32, dtype=torch.bfloat16)
    ql.w4a16_linear_triton(x, *q, 32)
    pending.take(ql.w4a16_linear_triton(x, *q, 32, defer=True))
    assert [(k[:2], k[-1]) for k in ql._tuner.chosen] == [((1, 96), False), ((1, 96), True)]  # a pick per mode


def test_cold_copies_cover_twice_the_l2(monkeypatch):
    """The tuner times candidates over enough weight copies to stream them from DRAM, as decode does."""
    qw, s, z = torch.ones(64, 32, dtype=torch.int32), torch.ones(2, 32), torch.zeros(2, 32)  # 8192 + 2 x 256 B
    assert len(cold_copies((qw, s, z))) == 1  # no L2 off CUDA: timed on the weights themselves
    monkeypatch.setattr(autotune, "l2_bytes", lambda device: 40_000)
    copies = cold_copies((qw, s, z))
    assert len(copies) == 10 and copies[0][0] is qw  # ceil(2 * 40000 / 8704)
    assert all(torch.equal(c[0], qw) and c[0].data_ptr() != qw.data_ptr() for c in copies[1:])
    monkeypatch.setattr(autotune, "l2_bytes", lambda device: 50 << 20)
    assert len(cold_copies((qw, s))) == 16  # capped
    launched = []
    launch = autotune.cold_launcher((qw, s), lambda w: lambda cfg: launched.append((cfg, w[0].data_ptr())))
    assert launched == []  # nothing copied before the tuner times
    launch("cfg")
    assert len(launched) == 16 and len({ptr for _, ptr in launched}) == 16 and launched[0][1] == qw.data_ptr()


@pytest.mark.parametrize("bits", [4, 8])
def test_tuning_launches_over_cold_copies_and_leaves_the_workspace_clean(monkeypatch, bits):
    """The timing path (CUDA-only) under the interpreter: every candidate runs on every cold copy, deferred
    timing runs leave their sums in the shared workspace and after_timing must clear them, or the real call's
    sums would carry them."""
    x, w, bias = _case(1, 128, torch.bfloat16, K=1024)  # 8 / 16 blocks: the picked config splits K
    if bits == 4:
        qw, s, z = quantize_w4(w, 128, dtype=torch.bfloat16)
        weights, ref = (qw, s, z), ql.w4a16_linear_ref(x, qw, s, z, 128, bias)
    else:
        (qw, s), z = quantize_w8(w, 128, dtype=torch.bfloat16), None
        weights, ref = (qw, s), ql.w8a16_linear_ref(x, qw, s, 128, bias)
    packed = (ql._pack_w4 if bits == 4 else ql._pack_w8)(qw, 128)
    monkeypatch.setattr(autotune, "l2_bytes", lambda device: sum(t.nbytes for t in (packed, *weights[1:])))
    monkeypatch.setattr(ql, "_tuner", LaunchingTuner())
    fn = ql.w4a16_linear_triton if bits == 4 else ql.w8a16_linear_triton
    out = fn(x, packed, *weights[1:], 128, bias, defer=True)
    assert isinstance(out, pending.PendingSum)  # the sums come from the workspace the timing runs used
    assert ql._tuner.launched > 1  # all the candidates, each over 2 copies (2 x L2 / bytes)
    assert rel_err(pending.take(out), ref) < TOL[torch.bfloat16]
