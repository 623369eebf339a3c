"""Deferred split-K outputs (kernels/src/pending.py): a W4/W8 GEMV that stops after its atomic adds, and the
kernels that finish its sums (RMSNorm with and without the residual add, SiLU-mul, take, the fused
q/k-norm + RoPE + KV store) against the same
linear finished by its own epilogue. The sums add in another order (the bias joins split 0's partials),
so results agree to the model dtype's rounding (1e-2 relative in bf16), and the shared workspace must be
all-zero again after the consumer: the next GEMV adds into it.
"""

import pytest
import torch

from lmconvert.kernels import PendingSum, kv_cache, qkv_store, quant_linear as ql, rms_norm, rope, silu_mul, take
from lmconvert.kernels.activation import silu_mul_ref
from lmconvert.kernels.norm import rms_norm_ref
from lmconvert.quant.primitives import quantize_w4, quantize_w8

from kernel_testing import rel_err

CONSUMERS = {
    "take": (lambda y: take(y), lambda y: y),
    "rms_norm": (lambda y: rms_norm(y, torch.linspace(0.5, 1.5, y.shape[-1]).bfloat16(), 1e-6),
                 lambda y: rms_norm_ref(y, torch.linspace(0.5, 1.5, y.shape[-1]).bfloat16(), 1e-6)),
    "rms_norm+residual": (lambda y: rms_norm(y, torch.ones(y.shape[-1]).bfloat16(), 1e-6, RESIDUAL[: y.shape[0]]),
                          lambda y: rms_norm_ref(y, torch.ones(y.shape[-1]).bfloat16(), 1e-6, RESIDUAL[: y.shape[0]])),
    "silu_mul": (lambda y: silu_mul(y), silu_mul_ref),
}
RESIDUAL = torch.randn(8, 96, generator=torch.Generator().manual_seed(1)).bfloat16()


def _workspace_clean():
    ws, cnt = ql._workspaces[torch.device("cpu")]
    return not ws.any() and not cnt.any()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M, cfg", [(1, ("gemv", 32, 1, 2, 4, 0)), (1, ("gemv", 64, 1, 2, 4, 3)),
                                    (3, ("fused", 32, 8, 4, 2, False))])
@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_deferred_output_finished_by_consumer(bits, M, cfg, consumer):
    K, N, G = 640, 96, 128  # 5 (W4) / 10 (W8) blocks along K: the configs split K
    w, x, bias = torch.randn(N, K), torch.randn(M, K).bfloat16(), torch.randn(N).bfloat16()
    if bits == 4:
        qw, s, z = quantize_w4(w, G, dtype=torch.bfloat16)
        packed = ql._pack_w4(qw, G)
    else:
        (qw, s), z = quantize_w8(w, G, dtype=torch.bfloat16), None
        packed = ql._pack_w8(qw, G)
    _, _, run = ql.plan(x, packed, s, z, bias, G, bits)
    finished = run(cfg)  # the GEMV's own epilogue
    pending = run(cfg, defer=True)
    assert isinstance(pending, PendingSum) and pending.shape == (M, N) and pending.dtype == torch.bfloat16
    assert pending.sums.abs().sum() > 0  # the sums wait in the workspace
    deferred_fn, reference_fn = CONSUMERS[consumer]
    got, want = deferred_fn(pending), reference_fn(finished)
    for g, r in zip(got, want) if isinstance(got, tuple) else [(got, want)]:
        assert g.dtype == torch.bfloat16 and rel_err(g, r) < 1e-2, consumer
    assert _workspace_clean()


def test_unsplit_launch_returns_a_tensor():
    """defer only changes split-K launches: one program along K writes y itself."""
    K, N, G = 256, 96, 128
    qw, s, z = quantize_w4(torch.randn(N, K), G, dtype=torch.bfloat16)
    x = torch.randn(1, K).bfloat16()
    _, _, run = ql.plan(x, ql._pack_w4(qw, G), s, z, None, G, 4)
    out = run(("gemv", 32, 1, 16, 4, 0), defer=True)  # 2 blocks, 16 a program: no split
    assert isinstance(out, torch.Tensor) and torch.equal(out, run(("gemv", 32, 1, 16, 4, 0)))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kv_int8", [False, True])
@pytest.mark.parametrize("M, cfg", [(1, ("gemv", 32, 1, 2, 4, 0)), (3, ("fused", 32, 8, 4, 2, False))])
def test_deferred_qkv_finished_by_rope_and_store(qk_norm, kv_int8, M, cfg):
    """The fused q/k-norm + RoPE + KV store as the consumer: q, the cached k / v (int8: dequantized) and a
    padding row (slot -1, stores nothing) whose sums must still be zeroed."""
    H, KVH, D, K, G = 2, 1, 32, 640, 128
    N = (H + 2 * KVH) * D
    qw, s, z = quantize_w4(torch.randn(N, K), G, dtype=torch.bfloat16)
    x = torch.randn(M, K).bfloat16()
    _, _, run = ql.plan(x, ql._pack_w4(qw, G), s, z, torch.randn(N).bfloat16(), G, 4)
    finished, pending = run(cfg), run(cfg, defer=True)
    rope_cache = rope.build_rope_cache(D, 64, 1e4)
    positions = torch.arange(M) + 5
    slots = torch.arange(M) * 3 + 1
    slots[-1] = -1 if M > 1 else slots[-1]
    norms = (None, None)
    if qk_norm:
        norms = (torch.linspace(0.5, 1.5, D).bfloat16(), torch.linspace(1.5, 0.5, D).bfloat16())
    outputs = []
    for fn, qkv in ((qkv_store.rope_and_store, pending), (qkv_store.rope_and_store_ref, finished)):
        dtype = torch.int8 if kv_int8 else torch.bfloat16
        caches = [torch.zeros(2, 16, KVH, D, dtype=dtype) for _ in range(2)]
        scales = [torch.zeros(2, 16, KVH, 2, dtype=torch.float16) for _ in range(2)] if kv_int8 else [None, None]
        q = fn(qkv, H, positions, rope_cache, *caches, slots, *norms, 1e-6, *scales)
        kv = [kv_cache.dequantize_kv(c, sz, torch.float32) for c, sz in zip(caches, scales)] if kv_int8 else caches
        outputs.append((q, *kv))
    for got, want in zip(*outputs):
        assert rel_err(got, want) < 2e-2
    assert _workspace_clean()
