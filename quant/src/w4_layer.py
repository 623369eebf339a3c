"""W4 quantization of one decoder layer: AWQ scales, clip search, then rounding (GPTQ or nearest)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmconvert.quant.awq import SCALE_GROUPS, QuantSpec, choose_scale, fold_scale
from lmconvert.quant.config import QuantConfig
from lmconvert.quant.gptq import gptq_round, group_gram, hessian
from lmconvert.quant.grid import fit_grid
from lmconvert.quant.layer import CalibLayer
from lmconvert.quant.moe_layer import quantize_experts
from lmconvert.quant.primitives import fake_quantize, group_params, grid_values, pack_w4, round_to_grid


KEEP_QK = False


@dataclass(slots=True)
class LayerStats:
    loss_rtn: float  # relative squared error of the attention + MLP outputs with round-to-nearest weights
    loss: float  # the same with the weights as written
    expert_fallbacks: int = 0  # experts with too few calibration tokens, rounded on a plain grid (moe_layer.py)


class BlockProbe:
    """fp outputs of the attention and MLP blocks on a few sequences, to score any set of weights against."""

    def __init__(self, layer: CalibLayer, h: torch.Tensor):
        self.h = h
        self.attn = layer.attention(layer.attn_norm(h))
        self.h_mid = h + self.attn
        self.mlp = layer.mlp(layer.mlp_norm(self.h_mid))
        self.norm = self.attn.pow(2).sum().item() + self.mlp.pow(2).sum().item()

    def loss(self, layer: CalibLayer) -> float:
        attn = layer.attention(layer.attn_norm(self.h))
        mlp = layer.mlp(layer.mlp_norm(self.h_mid))
        return ((attn - self.attn).pow(2).sum().item() + (mlp - self.mlp).pow(2).sum().item()) / self.norm


def rtn_loss(layer: CalibLayer, probe: BlockProbe, spec: QuantSpec) -> float:
    modules = list(layer.linear.values())
    if layer.moe is not None:
        modules += [layer.moe.gate_up_proj, layer.moe.down_proj]
        if layer.moe.shared_expert is not None:
            modules += [layer.moe.shared_expert.gate_up_proj, layer.moe.shared_expert.down_proj]
    weights = [m.weight for m in modules]
    for m, w in zip(modules, weights):  # an expert stack's rows are [E * N, K]: groups run along K either way
        rows = w.reshape(-1, w.shape[-1])
        m.weight = fake_quantize(rows, spec.bits, spec.group_size, spec.symmetric, 1.0, spec.dtype).view_as(w)
    loss = probe.loss(layer)
    for m, w in zip(modules, weights):
        m.weight = w
    return loss


@torch.no_grad()
def quantize_layer_w4(layer: CalibLayer, h: torch.Tensor, qc: QuantConfig, spec: QuantSpec):
    """-> (engine tensors of the layer, the quantized layer's output stream, LayerStats).

    h [T, hidden]: this layer's input, i.e. the previous *quantized* layer's output on the calibration set.
    """
    fit_steps = max(1, qc.grid // 2)
    score_steps = 1  # ranking two scale candidates: the min/max grid, least-squares refitted, is enough
    n_loss = min(h.shape[0], max(1, qc.loss_tokens // layer.seqlen) * layer.seqlen)  # whole sequences
    probe = BlockProbe(layer, h[:n_loss])
    loss_rtn = rtn_loss(layer, probe, spec)

    # 1. fp forward: the input of every linear over the whole calibration set
    inputs = layer.linear_inputs(h)

    # 2. AWQ scales, folded into the op before each linear (x is rescaled with them)
    if qc.search_scale:
        for group in (g for g in SCALE_GROUPS if g.linear in layer.linear):
            s = choose_scale(layer, group, inputs[group.linear], n_loss, spec, qc.grid, score_steps if qc.clip else None)
            fold_scale(layer, group, s, inputs[group.linear], spec.dtype)

    # 3. the quantization grid of every linear (after all folds): ranges and zero points fitted to its inputs
    grids = {}  # name -> (scales, zeros)
    for name in layer.linear:
        w = layer.weight(name)
        if qc.clip:
            keep = slice(0, layer.cfg.q_size + layer.cfg.kv_size) if name == "qkv_proj" and KEEP_QK else None
            grids[name] = fit_grid(w, group_gram(inputs[name], spec.group_size), spec.bits, spec.symmetric, spec.dtype,
                                   fit_steps, keep_rows=keep, integer_zero=spec.integer_zero)
        else:
            grids[name] = group_params(w, spec.bits, spec.group_size, spec.symmetric, 1.0, spec.dtype, spec.integer_zero)
    del inputs

    # 4. round, in execution order: each linear's inputs come from the linears already quantized
    codes = {}

    def round_linear(name: str, x: torch.Tensor) -> None:
        w, (scales, zeros) = layer.weight(name), grids[name]
        q = gptq_round(w, hessian(x), scales, zeros, spec.bits) if qc.gptq else round_to_grid(w, scales, zeros, spec.bits)
        codes[name] = q
        layer.set_weight(name, grid_values(q, scales, zeros))

    x_attn = layer.attn_norm(h)
    round_linear("qkv_proj", x_attn)
    _, o_in = layer.attention(x_attn, capture_o_input=True)
    del x_attn
    round_linear("o_proj", o_in)
    h = h + layer.linear["o_proj"](o_in)
    del o_in
    x_mlp = layer.mlp_norm(h)
    if layer.moe is not None:  # experts: each on its routed tokens
        expert_tensors, fallbacks = quantize_experts(layer, x_mlp, qc, spec, n_loss)
        h = h + layer.mlp(x_mlp)
        return _engine_tensors(layer, codes, grids, spec, expert_tensors), h, \
            LayerStats(loss_rtn, probe.loss(layer), fallbacks)
    round_linear("gate_up_proj", x_mlp)
    _, down_in = layer.mlp(x_mlp, capture_down_input=True)
    del x_mlp
    round_linear("down_proj", down_in)
    h = h + layer.linear["down_proj"](down_in)
    del down_in
    return _engine_tensors(layer, codes, grids, spec), h, LayerStats(loss_rtn, probe.loss(layer))


def _engine_tensors(layer: CalibLayer, codes: dict, grids: dict, spec: QuantSpec, packed: dict | None = None) -> dict:
    """The layer's engine tensors: rounded linears packed, the rest (norms, biases, router) cast to the engine
    dtype; packed: tensors already in the engine layout (the experts')."""
    tensors = dict(packed or {})
    for name, t in layer.tensors().items():
        module, attr = name.rsplit(".", 1)
        if module in codes and attr == "weight":
            tensors.update({f"{module}.{k}": v.cpu() for k, v in pack_w4(codes[module], *grids[module], spec.dtype).items()})
        elif not (attr == "weight" and f"{module}.qweight" in tensors):  # an expert stack packed already
            tensors[name] = t.to(device="cpu", dtype=spec.dtype)
    return tensors
