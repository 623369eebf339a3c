"""AWQ (Lin et al. 2023): per-input-channel scales and weight clipping, searched on calibration activations.

Scaling input channel k of a linear by s_k and dividing the op that feeds it by s_k leaves the fp
model unchanged, but shrinks the relative rounding error of the channels that carry large activations.
The scales are s = mean|x|^alpha (normalized), alpha picked from a grid by the error of the *block* the
linear sits in: attention for qkv, the whole MLP for gate_up, the linear itself for o and down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmconvert.quant.gptq import group_gram
from lmconvert.quant.grid import fit_grid
from lmconvert.quant.layer import CalibLayer
from lmconvert.quant.primitives import fake_quantize, snap_to_grid


@dataclass(frozen=True, slots=True)
class ScaleGroup:
    linear: str  # the linear whose input channels are scaled
    absorb: str  # what takes 1/s: a norm, or rows of the linear that feeds this one
    block: str  # whose output error picks the scale: "attention", "mlp" or "linear"


# Same for every llama-family architecture: the data AutoAWQ spreads over one file per model.
SCALE_GROUPS = (
    ScaleGroup("qkv_proj", "input_norm", "attention"),
    ScaleGroup("o_proj", "v_rows", "linear"),  # v rows feed o's input channels (GQA: one v row, many heads)
    ScaleGroup("gate_up_proj", "post_attn_norm", "mlp"),
    ScaleGroup("down_proj", "up_rows", "linear"),  # silu(gate) * up is linear in up's rows
)


@dataclass(slots=True)
class QuantSpec:
    bits: int
    group_size: int
    symmetric: bool
    dtype: torch.dtype  # the engine's: scales are rounded to it
    integer_zero: bool = False  # free zero points (see primitives.group_params); True: classic RTN grid

    def fake(self, w: torch.Tensor, clip=1.0) -> torch.Tensor:
        return fake_quantize(w, self.bits, self.group_size, self.symmetric, clip, self.dtype, self.integer_zero)


def run_block(layer: CalibLayer, group: ScaleGroup, x: torch.Tensor) -> torch.Tensor:
    if group.block == "attention":
        return layer.attention(x)
    if group.block == "mlp":
        return layer.mlp(x)
    return layer.linear[group.linear](x)


def shared_over_kv_heads(layer: CalibLayer, group: ScaleGroup, per_channel: torch.Tensor,
                         reduce=torch.mean) -> torch.Tensor:
    """For v -> o, one value per channel of a kv head (reduce over the query heads that share it): o's input
    channel scale is folded into a v row, and one v row feeds every head of its group."""
    if group.absorb != "v_rows":
        return per_channel
    cfg = layer.cfg
    per_head = per_channel.view(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    return reduce(per_head, dim=1, keepdim=True).expand_as(per_head).reshape(-1)


def channel_magnitude(layer: CalibLayer, group: ScaleGroup, x: torch.Tensor) -> torch.Tensor:
    """mean |x| per input channel; for v -> o, averaged over the heads that share one kv head."""
    return shared_over_kv_heads(layer, group, x.abs().mean(dim=0))


def search_scale(layer: CalibLayer, group: ScaleGroup, x: torch.Tensor, n_loss: int, spec: QuantSpec,
                 grid: int, target: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Best scales [K] for group.linear on inputs x [T, K], and the block loss at every grid point.

    Loss: mean squared error of the block output on the first n_loss tokens (target: the fp output there,
    if already computed), with the linear's weight replaced by Q(W s) / s (alpha = 0 is plain round-to-nearest).
    """
    mag = channel_magnitude(layer, group, x).clamp(min=1e-6)
    x_loss = x[:n_loss]
    w = layer.weight(group.linear)
    with torch.no_grad():
        target = run_block(layer, group, x_loss) if target is None else target
        losses, best, best_loss = [], None, float("inf")
        for i in range(grid):
            s = mag.pow(i / grid)
            s = s / (s.max() * s.min()).sqrt()
            layer.set_weight(group.linear, spec.fake(w * s).div_(s))
            loss = (run_block(layer, group, x_loss) - target).pow(2).mean().item()
            losses.append(loss)
            if loss < best_loss:
                best, best_loss = s, loss
        layer.set_weight(group.linear, w)
    return best, losses


def fold_scale(layer: CalibLayer, group: ScaleGroup, s: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    """W <- W diag(s), feeding op <- op / s, x <- x / s (in place). Folded norms are rounded to the engine dtype."""
    layer.set_weight(group.linear, layer.weight(group.linear) * s)
    if group.absorb in layer.norm:
        norm = layer.norm[group.absorb]
        norm.weight = (norm.weight / s).to(dtype).float()
    else:
        feeder, rows = ("qkv_proj", layer.v_rows()) if group.absorb == "v_rows" else ("gate_up_proj", layer.up_rows())
        if group.absorb == "v_rows":  # o's channels come in heads; one kv head's scale is shared by its group
            cfg = layer.cfg
            s_rows = s.view(cfg.num_kv_heads, -1, cfg.head_dim)[:, 0].reshape(-1)
        else:
            s_rows = s
        w = layer.weight(feeder).clone()
        w[rows] /= s_rows.unsqueeze(1)
        layer.set_weight(feeder, w)
        bias = layer.linear[feeder].bias
        if bias is not None:
            bias = bias.clone()
            bias[rows] /= s_rows
            layer.linear[feeder].bias = bias
    x /= s


def fitted_block_loss(layer: CalibLayer, group: ScaleGroup, x: torch.Tensor, s: torch.Tensor, n_loss: int,
                      spec: QuantSpec, steps: int, target: torch.Tensor) -> float:
    """Block loss with the linear quantized about as it will be: W s on a grid fitted to the inputs x / s
    (with a shorter range search than the final fit: this only ranks two candidates)."""
    w = layer.weight(group.linear)
    ws = w * s
    scales, zeros = fit_grid(ws, group_gram(x / s, spec.group_size), spec.bits, spec.symmetric, spec.dtype, steps,
                             integer_zero=spec.integer_zero)
    with torch.no_grad():
        layer.set_weight(group.linear, snap_to_grid(ws, scales, zeros, spec.bits).div_(s))
        loss = (run_block(layer, group, x[:n_loss]) - target).pow(2).mean().item()
    layer.set_weight(group.linear, w)
    return loss


def choose_scale(layer: CalibLayer, group: ScaleGroup, x: torch.Tensor, n_loss: int, spec: QuantSpec, grid: int,
                 fit_steps: int | None) -> torch.Tensor:
    """search_scale's pick, checked against no scaling with the fitted grid (fit_steps) when there is one.

    The search scores exponents with a plain min/max grid; the fitted grid can make scaling unnecessary
    (weights that already sit on a 4-bit grid, e.g. from a GGUF), so both finalists are scored as written.
    The block's fp output on the loss tokens is computed once for all of it.
    """
    with torch.no_grad():
        target = run_block(layer, group, x[:n_loss])
    s, _ = search_scale(layer, group, x, n_loss, spec, grid, target)
    if not fit_steps:
        return s
    scored = [(c, fitted_block_loss(layer, group, x, c, n_loss, spec, fit_steps, target))
              for c in (s, torch.ones_like(s))]
    return min(scored, key=lambda c: c[1])[0]  # a tie keeps the searched scales
