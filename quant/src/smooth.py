"""SmoothQuant (Xiao et al. 2022) W8A8 of one decoder layer: smoothing scales, then int8 per-channel weights.

Per-token int8 activations lose the small channels of a token whose few outlier channels set its scale.
Dividing input channel j by s_j (folded into the op that feeds the linear) and multiplying the weight's
column j by s_j leaves the fp model unchanged and moves part of the outliers into the weights, which
have one int8 scale per output row and absorb them better:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)     (max over calibration tokens / over output rows)
Folding reuses AWQ's ScaleGroups (awq.fold_scale): qkv into input_norm, gate_up into post_attn_norm, and
optionally o into v's rows and down into up's rows (see SMOOTH_GROUPS).
"""

from __future__ import annotations

import torch

from lmconvert.quant.awq import SCALE_GROUPS, ScaleGroup, fold_scale, shared_over_kv_heads
from lmconvert.quant.config import QuantConfig
from lmconvert.quant.layer import LINEARS, CalibLayer
from lmconvert.quant.primitives import quantize_w8
from lmconvert.quant.w4_layer import BlockProbe, LayerStats

# Measured on SmolLM2-135M (docs/quantization.md): smoothing all four linears (o via v's rows, down via
# up's rows) beats smoothing only the two norm-fed ones.
SMOOTH_GROUPS = SCALE_GROUPS
EPS = 1e-5  # floor of the maxima: a dead channel gets a finite scale


def smoothing_scale(layer: CalibLayer, group: ScaleGroup, x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    act = shared_over_kv_heads(layer, group, x_absmax, torch.amax).clamp(min=EPS)
    wmax = shared_over_kv_heads(layer, group, layer.weight(group.linear).abs().amax(dim=0), torch.amax).clamp(min=EPS)
    return act.pow(alpha) / wmax.pow(1 - alpha)


def w8a8_tensors(layer: CalibLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Engine tensors of the (smoothed) layer: int8 per-output-channel linears, the rest in dtype, on CPU."""
    out = {}
    for name, t in layer.tensors().items():
        module, attr = name.rsplit(".", 1)
        if module in LINEARS and attr == "weight":
            qweight, scales = quantize_w8(t, None, dtype)
            out.update({f"{module}.qweight": qweight.contiguous().cpu(), f"{module}.scales": scales.cpu()})
        else:
            out[name] = t.to(device="cpu", dtype=dtype)
    return out


def as_engine(layer: CalibLayer, tensors: dict[str, torch.Tensor], qc: QuantConfig) -> CalibLayer:
    """The layer as the engine will run it: W8A8 linears with per-token int8 activations."""
    return CalibLayer(layer.cfg, tensors, layer.device, layer.rope_cache, layer.seqlen, quant=qc.block())


@torch.no_grad()
def quantize_layer_w8a8(layer: CalibLayer, h: torch.Tensor, qc: QuantConfig, dtype: torch.dtype):
    """-> (engine tensors, the W8A8 layer's output stream, LayerStats: block error unsmoothed -> smoothed).

    h [T, hidden]: this layer's input, the previous *quantized* layer's output on the calibration set.
    """
    n_loss = min(h.shape[0], max(1, qc.loss_tokens // layer.seqlen) * layer.seqlen)  # whole sequences
    probe = BlockProbe(layer, h[:n_loss])
    loss_plain = probe.loss(as_engine(layer, w8a8_tensors(layer, dtype), qc))

    absmax = {name: x.abs().amax(dim=0) for name, x in layer.linear_inputs(h).items()}
    for group in SMOOTH_GROUPS:
        s = smoothing_scale(layer, group, absmax[group.linear], qc.alpha)
        fold_scale(layer, group, s, absmax[group.linear], dtype)  # also divides the maxima by s

    tensors = w8a8_tensors(layer, dtype)
    quantized = as_engine(layer, tensors, qc)
    return tensors, quantized.output(h), LayerStats(loss_plain, probe.loss(quantized))
