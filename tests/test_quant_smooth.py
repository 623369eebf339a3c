"""SmoothQuant's folding: the smoothed fp layer computes what the original did, and each fold balances the
activation and weight maxima of its channels (alpha 0.5: both become sqrt(max|x| * max|w|))."""

from __future__ import annotations

import pytest
import torch

from lmconvert import kernels
from lmconvert.engine import open_engine
from lmconvert.quant.awq import fold_scale, shared_over_kv_heads
from lmconvert.quant.layer import CalibLayer
from lmconvert.quant.smooth import SMOOTH_GROUPS, smoothing_scale

SEQ = 16


def linear_inputs_absmax(layer: CalibLayer, h: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.abs().amax(dim=0) for name, x in layer.linear_inputs(h).items()}


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # GQA 4 heads / 2 kv heads; qwen2: qkv bias, qwen3: q/k norms
def test_smoothing_keeps_the_fp_layer(arch, tiny_engine):
    source = open_engine(tiny_engine(arch))
    cfg = source.config
    rope = kernels.build_rope_cache(cfg.head_dim, SEQ, cfg.rope_theta, cfg.rope_scaling, torch.device("cpu"))
    layer = CalibLayer(cfg, source.layer_tensors(0), torch.device("cpu"), rope, SEQ)
    torch.manual_seed(0)
    h = torch.randn(4 * SEQ, cfg.hidden_size)
    h[:, 3] *= 30  # an outlier channel, as real models have
    before = layer.output(h)
    absmax = linear_inputs_absmax(layer, h)
    for group in SMOOTH_GROUPS:
        s = smoothing_scale(layer, group, absmax[group.linear], 0.5)
        assert s.std() > 0
        fold_scale(layer, group, s, absmax[group.linear], torch.float32)
        w_max = shared_over_kv_heads(layer, group, layer.weight(group.linear).abs().amax(dim=0), torch.amax)
        x_max = shared_over_kv_heads(layer, group, absmax[group.linear], torch.amax)
        torch.testing.assert_close(x_max, w_max, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.output(h), before, rtol=1e-4, atol=1e-5)
    after = linear_inputs_absmax(layer, h)  # the maxima were divided by s as the inputs are
    for name, m in absmax.items():
        torch.testing.assert_close(after[name], m, rtol=1e-4, atol=1e-6)
