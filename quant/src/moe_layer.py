"""W4 quantization of a mixture-of-experts layer's experts, each calibrated on the tokens routed to it.

Per expert e, on the calibration tokens the router sends to e (routed on the stream the quantized
attention produced, as the engine will route):
  1. AWQ scale for down_proj's input channels, absorbed into e's own up rows (silu(gate) * up is linear in
     up), picked by the error of e's down output over a grid of exponents;
  2. the grid (scales, zero points) of gate_up and down fitted to e's inputs, as for a dense linear;
  3. rounding: GPTQ on e's Hessian, or to nearest.
Qwen2-MoE's shared expert goes the same way on every token.
gate_up gets no input scaling: its inputs come from the post-attention norm that every expert and the router
share, so one scale would have to suit all experts at once.
An expert that receives fewer than MIN_EXPERT_TOKENS calibration tokens falls back to a plain min/max grid
rounded to nearest (the RTN baseline, which needs no data); LayerStats counts them, the summary reports it.
The router is never quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmconvert import kernels
from lmconvert.quant.awq import QuantSpec
from lmconvert.quant.config import QuantConfig
from lmconvert.quant.gptq import gptq_round, group_gram, hessian
from lmconvert.quant.grid import fit_grid
from lmconvert.quant.layer import CalibLayer
from lmconvert.quant.primitives import grid_values, group_params, pack_w4, round_to_grid

MIN_EXPERT_TOKENS = 16  # below: too few rows to fit 4-bit grids to (a 128-wide group's Gram would be rank < 16)


def down_scale(w_down: torch.Tensor, act: torch.Tensor, spec: QuantSpec, grid: int, n_loss: int) -> torch.Tensor:
    """AWQ scales [I] for one expert's down_proj: s = mean|act|^alpha (normalized), alpha on a grid, scored by the
    error of act @ (Q(W s) / s)^T against the fp output on the first n_loss rows (alpha 0: no scaling)."""
    mag = act.abs().mean(dim=0).clamp(min=1e-6)
    x = act[:n_loss]
    target = x @ w_down.t()
    best, best_loss = torch.ones_like(mag), float("inf")
    for i in range(grid):
        s = mag.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        loss = (x @ (spec.fake(w_down * s) / s).t() - target).pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


def _round(w, x, qc: QuantConfig, spec: QuantSpec, fit_steps: int):
    """(codes, scales, zeros) of one linear [N, K] fitted to its inputs x [T, K]."""
    scales, zeros = fit_grid(w, group_gram(x, spec.group_size), spec.bits, spec.symmetric, spec.dtype, fit_steps,
                             integer_zero=spec.integer_zero) if qc.clip else \
        group_params(w, spec.bits, spec.group_size, spec.symmetric, 1.0, spec.dtype, spec.integer_zero)
    q = gptq_round(w, hessian(x), scales, zeros, spec.bits) if qc.gptq else round_to_grid(w, scales, zeros, spec.bits)
    return q, scales, zeros


def _round_plain(w, spec: QuantSpec):
    scales, zeros = group_params(w, spec.bits, spec.group_size, spec.symmetric, 1.0, spec.dtype, spec.integer_zero)
    return round_to_grid(w, scales, zeros, spec.bits), scales, zeros


def quantize_mlp(w_gu: torch.Tensor, w_dn: torch.Tensor, x: torch.Tensor, qc: QuantConfig, spec: QuantSpec,
                 n_loss: int):
    """One SwiGLU MLP (gate_up [2I, H], down [H, I]) on its inputs x: ((codes, scales, zeros) of gate_up, of down)."""
    if x.shape[0] < MIN_EXPERT_TOKENS:
        return _round_plain(w_gu, spec), _round_plain(w_dn, spec)
    fit_steps = max(1, qc.grid // 2)
    if qc.search_scale:
        I = w_dn.shape[1]
        s = down_scale(w_dn, kernels.silu_mul(F.linear(x, w_gu)), spec, qc.grid, n_loss)
        w_dn, w_gu = w_dn * s, w_gu.clone()
        w_gu[I:] /= s.unsqueeze(1)
    gu = _round(w_gu, x, qc, spec, fit_steps)
    act_q = kernels.silu_mul(F.linear(x, grid_values(*gu)))  # down sees the quantized gate_up's output
    return gu, _round(w_dn, act_q, qc, spec, fit_steps)


@torch.no_grad()
def quantize_experts(layer: CalibLayer, x: torch.Tensor, qc: QuantConfig, spec: QuantSpec, n_loss: int):
    """x [T, hidden]: the MoE block's normed input. Sets the layer's experts (and shared expert) to their quantized
    values and returns (engine tensors "experts.*" / "shared_expert.*", experts that fell back to the plain grid)."""
    moe = layer.moe
    _, ids = moe.route(x)
    packed = {"experts.gate_up_proj": [], "experts.down_proj": []}
    w_gu_all, w_dn_all = moe.gate_up_proj.weight.clone(), moe.down_proj.weight.clone()
    fallbacks = 0
    for e in range(w_gu_all.shape[0]):
        xe = x[(ids == e).any(dim=-1)]
        fallbacks += xe.shape[0] < MIN_EXPERT_TOKENS
        quantized = quantize_mlp(w_gu_all[e], w_dn_all[e], xe, qc, spec, n_loss)
        for name, (q, scales, zeros), full in zip(packed, quantized, (w_gu_all, w_dn_all)):
            full[e] = grid_values(q, scales, zeros)
            packed[name].append({k: v.cpu() for k, v in pack_w4(q, scales, zeros, spec.dtype).items()})
    moe.gate_up_proj.weight, moe.down_proj.weight = w_gu_all, w_dn_all
    tensors = {f"{name}.{k}": torch.stack([p[k] for p in parts]) for name, parts in packed.items() for k in parts[0]}
    if moe.shared_expert is not None:  # every token reaches it: a dense MLP without the norm-side scale
        shared = moe.shared_expert
        quantized = quantize_mlp(shared.gate_up_proj.weight, shared.down_proj.weight, x, qc, spec, n_loss)
        for name, (q, scales, zeros) in zip(("gate_up_proj", "down_proj"), quantized):
            getattr(shared, name).weight = grid_values(q, scales, zeros)
            tensors.update({f"shared_expert.{name}.{k}": v.cpu()
                            for k, v in pack_w4(q, scales, zeros, spec.dtype).items()})
    return tensors, fallbacks
