"""rms_norm, rope and silu_mul: Triton (interpreted) vs reference vs Hugging Face's own modules.

rms_norm and silu_mul keep HF's roundings, so the references match HF bit for bit. Triton's CPU
interpreter truncates fp32 -> bf16 instead of rounding to nearest, so interpreted bf16 results are held to
4 bf16 ulps (fp16 stays bitwise; roundings compound through the residual add); benchmarks/kernel_bench.py checks bitwise equality on the GPU. RoPE computes
in fp32 and rounds once, HF rounds after each bf16 op: relative error < 4e-3.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from lmconvert.errors import UserError
from lmconvert.kernels import apply_rope, build_rope_cache, rms_norm, silu_mul
from lmconvert.kernels.activation import silu_mul_triton
from lmconvert.kernels.norm import rms_norm_triton
from lmconvert.kernels.rope import apply_rope_triton

from kernel_testing import rel_err


def assert_interpreted_close(out, expected):
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out, expected, rtol=2**-5, atol=1e-5)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", [(5, 96), (3, 4, 32)])  # hidden norm; Qwen3 per-head q/k norm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_matches_hf_bitwise(shape, dtype):
    hf = LlamaRMSNorm(shape[-1], eps=1e-6).to(dtype)
    hf.weight.data = torch.randn(shape[-1], dtype=dtype)
    x = torch.randn(shape, dtype=dtype) * 3
    expected = hf(x)
    assert torch.equal(rms_norm(x, hf.weight, 1e-6), expected)
    assert_interpreted_close(rms_norm_triton(x, hf.weight, 1e-6), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", [rms_norm, rms_norm_triton])
def test_rms_norm_with_residual(fn, dtype):
    x, res = torch.randn(4, 80, dtype=dtype), torch.randn(4, 80, dtype=dtype)
    w = torch.randn(80, dtype=dtype)
    hf = LlamaRMSNorm(80, eps=1e-5).to(dtype)
    hf.weight.data = w
    out, new_res = fn(x, w, 1e-5, residual=res)
    check = torch.equal if fn is rms_norm else assert_interpreted_close
    assert check(new_res, x + res) is not False  # HF: residual + hidden_states in the model dtype
    assert check(out, hf(x + res)) is not False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_matches_hf(dtype):
    x = torch.randn(3, 2, 2 * 80, dtype=dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.equal(silu_mul(x), expected)
    torch.testing.assert_close(silu_mul_triton(x), expected, rtol=2**-6 if dtype == torch.bfloat16 else 2**-10,
                               atol=1e-5)  # Triton's exp vs torch's may differ by an ulp before rounding


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rope_cache_matches_transformers(scaling):
    kw = dict(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, max_position_embeddings=256)
    config = LlamaConfig(**kw, rope_scaling=scaling) if scaling else LlamaConfig(**kw)
    hf = LlamaRotaryEmbedding(config)
    positions = torch.arange(200).unsqueeze(0)
    cos, sin = hf(torch.zeros(1, 200, 128), positions)  # fp32: [1, T, D] = freqs duplicated
    cache = build_rope_cache(128, 200, 500000.0, scaling)
    torch.testing.assert_close(cache[:, :64], cos[0, :, :64], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache[:, 64:], sin[0, :, :64], rtol=0, atol=1e-5)


def test_rope_unsupported_scaling_is_user_error():
    with pytest.raises(UserError):
        build_rope_cache(64, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("fn", [apply_rope, apply_rope_triton])
def test_apply_rope_matches_hf(fn):
    T, H, KVH, D = 7, 4, 2, 64
    cache = build_rope_cache(D, 100, 10000.0)
    positions = torch.tensor([0, 1, 2, 50, 51, 99, 3])
    qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=torch.bfloat16)
    q = qkv[:, :H * D].view(T, H, D)  # strided view, as sliced from the fused qkv output
    k = qkv[:, H * D:(H + KVH) * D]  # flat [T, KVH*D] is accepted too
    q_out, k_out = fn(q, k, positions, cache)
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1).to(q.dtype), torch.cat([sin, sin], -1).to(q.dtype)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.view(T, KVH, D).transpose(0, 1)[None], cos[None], sin[None])
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert rel_err(q_out, q_hf[0].transpose(0, 1)) < 4e-3
    assert rel_err(k_out.view(T, KVH, D), k_hf[0].transpose(0, 1)) < 4e-3
    q_ref, k_ref = apply_rope(q, k, positions, cache)
    assert_interpreted_close(q_out, q_ref)
    assert_interpreted_close(k_out, k_ref)
