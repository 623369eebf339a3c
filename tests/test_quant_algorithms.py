"""Quantization building blocks against their definitions: packing, grids, GPTQ, AWQ scale search and folding."""

from __future__ import annotations

import pytest
import torch

from lmconvert import kernels
from lmconvert.engine import open_engine
from lmconvert.quant.awq import SCALE_GROUPS, QuantSpec, fold_scale, search_scale
from lmconvert.quant.gptq import group_gram, gptq_round, hessian, output_error
from lmconvert.quant.grid import fit_grid, group_error
from lmconvert.quant.layer import CalibLayer
from lmconvert.quant.primitives import (dequantize_w4, dequantize_w8, grid_values, group_params, pack_int4,
                                        quantize_w4, quantize_w8, round_to_grid, unpack_int4)

SEQLEN = 16


def correlated_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Activations with a low-rank structure and a few loud channels, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=g) @ torch.randn(8, dim, generator=g) + 0.3 * torch.randn(tokens, dim, generator=g)
    x[:, :4] *= 10
    return x


def test_pack_unpack_exact():
    q = torch.randint(0, 16, (256, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = pack_int4(q)
    assert packed.shape == (32, 24) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), q)
    assert (packed[0, 0] >> 4) & 0xF == q[1, 0]  # nibble j of word r holds row 8r + j


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_w4_dequantized_within_half_a_step(symmetric, group_size):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    qweight, scales, zeros = quantize_w4(w, group_size, symmetric, dtype=torch.float32)
    back = dequantize_w4(qweight, scales, zeros, group_size).t()
    step = scales.t().repeat_interleave(group_size, dim=1)
    err = (back - w).abs()
    if symmetric:  # the signed range is -8..7 steps of absmax / 7: only +absmax... fits, -absmax too
        assert (err <= step / 2 + 1e-6).all()
    else:  # the zero point is rounded, so the ends of the range may be off by up to one more half step
        assert (err <= step + 1e-6).all() and (err <= step / 2 + 1e-6).float().mean() > 0.95


def test_w8_dequantized_within_half_a_step():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    for group_size in (None, 32):
        qweight, scales = quantize_w8(w, group_size, dtype=torch.float32)
        G = group_size or 128
        back = dequantize_w8(qweight, scales, G).t()
        assert ((back - w).abs() <= scales.t().repeat_interleave(G, dim=1) / 2 + 1e-6).all()


def test_fitted_grid_lowers_group_output_error():
    x, w = correlated_inputs(2048, 128), torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    gram = group_gram(x, 32)
    for symmetric in (False, True):
        s, z = group_params(w, 4, 32, symmetric)
        plain = group_error(w, grid_values(round_to_grid(w, s, z, 4), s, z), gram).sum()
        s, z = fit_grid(w, gram, 4, symmetric, torch.float32, steps=10)
        fitted = group_error(w, grid_values(round_to_grid(w, s, z, 4), s, z), gram).sum()
        assert fitted < 0.8 * plain


def test_gptq_lowers_output_error_vs_nearest():
    x, w = correlated_inputs(4096, 256), torch.randn(96, 256, generator=torch.Generator().manual_seed(4))
    H = hessian(x)
    s, z = group_params(w, 4, 64, False)
    nearest = output_error(w, round_to_grid(w, s, z, 4), s, z, H)
    codes = gptq_round(w, H, s, z, 4)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    assert output_error(w, codes, s, z, H) < 0.5 * nearest


def calib_layer(tiny_engine, arch: str) -> tuple[CalibLayer, torch.Tensor]:
    engine = open_engine(tiny_engine(arch))
    cfg = engine.config
    rope = kernels.build_rope_cache(cfg.head_dim, SEQLEN, cfg.rope_theta, cfg.rope_scaling)
    layer = CalibLayer(cfg, engine.layer_tensors(0), torch.device("cpu"), rope, SEQLEN)
    h = correlated_inputs(8 * SEQLEN, cfg.hidden_size, seed=5)
    return layer, h


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # GQA everywhere, qkv bias (qwen2), q/k norm (qwen3)
def test_scale_folding_keeps_fp_outputs(arch, tiny_engine):
    layer, h = calib_layer(tiny_engine, arch)
    before = layer.output(h)
    g = torch.Generator().manual_seed(6)
    x = {"qkv_proj": layer.attn_norm(h)}
    _, x["o_proj"] = layer.attention(x["qkv_proj"], capture_o_input=True)
    x_mlp = layer.mlp_norm(h + layer.attention(x["qkv_proj"]))
    _, x["down_proj"] = layer.mlp(x_mlp, capture_down_input=True)
    x["gate_up_proj"] = x_mlp
    for group in SCALE_GROUPS:
        s = torch.rand(x[group.linear].shape[1], generator=g) * 3 + 0.2
        if group.absorb == "v_rows":  # one scale per kv head's channel, as the search makes them
            s = s[: layer.cfg.kv_size].view(layer.cfg.num_kv_heads, 1, -1)
            s = s.expand(-1, layer.cfg.num_heads // layer.cfg.num_kv_heads, -1).reshape(-1)
        fold_scale(layer, group, s, x[group.linear], torch.float32)
    assert (layer.output(h) - before).abs().max().item() <= 1e-5


def test_scale_search_lowers_block_error(tiny_engine):
    """AWQ's point: with loud input channels, scaling them up before rounding lowers the block's output error."""
    layer, h = calib_layer(tiny_engine, "llama")
    spec = QuantSpec(4, 32, False, torch.float32)
    x = layer.mlp_norm(h)
    group = next(g for g in SCALE_GROUPS if g.linear == "gate_up_proj")
    s, losses = search_scale(layer, group, x, 4 * SEQLEN, spec, grid=10)
    rtn = losses[0]  # exponent 0: s = 1, plain round-to-nearest
    assert min(losses) < 0.7 * rtn
    assert s.argmax() < 4  # the loud channels get the large scales
