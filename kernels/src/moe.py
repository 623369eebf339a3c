"""Mixture-of-experts FFN: top-k routing and the experts' SwiGLU MLPs over the tokens routed to them.

Each of a layer's two expert linears comes stacked over experts (`Experts`) in the engine's layouts
(docs/engine-format.md): fp weight [E, N, K] (nn.Linear rows per expert), W4 qweight int32 [E, K/8, N] with
scales / zeros [E, K/G, N], W8 qweight int8 [E, K, N] with scales [E, K/G, N]. gate_up's N is 2I (gate rows,
then up rows), down's is the hidden size.

A token t routed to experts ids[t, 0..k-1] with weights w[t, j] gets
    sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),   e = ids[t, j]
Rows of the intermediate tensors are (token, slot) pairs p = t * k + j, so every kernel works on pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._triton import use_triton
from .activation import silu_mul


class Experts(NamedTuple):
    """One linear of every expert of a layer, stacked on dim 0. bits 16: `weight`; 4 / 8: qweight, scales
    (and zeros for 4); group_size: K for per-channel W8."""

    bits: int
    group_size: int
    weight: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return (self.weight if self.bits == 16 else self.qweight).shape[0]

    @property
    def out_features(self) -> int:
        if self.bits == 16:
            return self.weight.shape[1]
        return self.scales.shape[-2] if self.packed and self.bits == 4 else self.scales.shape[-1]  # [.., N, 2]

    @property
    def packed(self) -> bool:
        """Repacked for ATen's CPU matmuls (prepare_experts), not the engine layout."""
        return self.bits == 4 and self.qweight.dtype == torch.uint8 or self.bits == 8 and self.scales.dim() == 2

    def expert(self, e: int) -> "Experts":
        """Expert e's slice (each tensor's [e])."""
        return Experts(self.bits, self.group_size, *(t[e] if t is not None else None for t in self[2:]))


def route_topk_ref(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights fp32 [T, k], expert ids int64 [T, k]): softmax over all experts in fp32,
    the k largest, renormalized to sum 1 where the model says so (Qwen3-MoE's norm_topk_prob; Mixtral always)."""
    if use_triton(logits):
        from .moe_triton import route_topk_triton

        return route_topk_triton(logits, k, renormalize)
    return route_topk_ref(logits, k, renormalize)


def prepare_experts(w: Experts) -> Experts:
    """Once per layer at load: every expert through the dense linears' preparation (quant_linear.prepare_w4 /
    prepare_w8), one at a time into the stacked result. On CPU that repacks them for ATen's packed int4 / int8
    matmuls where their kernels take the shape, so a decode step reads the packed bytes of the experts it picked
    instead of dequantizing each one. CUDA keeps the engine layout (the MoE kernels read it), as do fp experts
    and shapes ATen refuses."""
    from .quant_linear import prepare_w4, prepare_w8

    if w.bits == 16 or w.qweight.device.type != "cpu" or w.packed:
        return w

    def prepare(e: int) -> tuple:
        if w.bits == 4:
            return prepare_w4(w.qweight[e], w.scales[e], w.zeros[e], w.group_size)
        return prepare_w8(w.qweight[e], w.scales[e], w.group_size)

    first = prepare(0)
    if not Experts(w.bits, w.group_size, None, *(t if t is None else t.unsqueeze(0) for t in first)).packed:
        return w  # a shape ATen's kernels refuse: the engine layout as it is
    stacked = [t if t is None else t.new_empty(w.num_experts, *t.shape) for t in first]
    for e in range(w.num_experts):
        for dst, t in zip(stacked, first if e == 0 else prepare(e)):
            if dst is not None:
                dst[e] = t
    return Experts(w.bits, w.group_size, None, *stacked)


def expert_matmul(x: torch.Tensor, w: Experts, e: int) -> torch.Tensor:
    """x [M, K] @ expert e's weight -> [M, N] in x's dtype: ATen's packed kernel on repacked experts, else the
    expert's weight dequantized (the reference)."""
    from . import cpu_linear

    if w.packed and w.bits == 4:
        return cpu_linear.w4_linear(x, w.qweight[e], w.scales[e], w.group_size)
    if w.packed:
        return cpu_linear.w8_linear(x, w.qweight[e], w.scales[e])
    return F.linear(x, expert_weight(w, e, x.dtype).t())


def expert_weight(w: Experts, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's weight as a dense [K, N] matrix in dtype (the quantized ones dequantized)."""
    from .quant_linear import _dequant_w4_ref, _dequant_w8_ref

    if w.bits == 16:
        return w.weight[e].t().to(dtype)
    if w.bits == 4:
        return _dequant_w4_ref(w.qweight[e], w.scales[e], w.zeros[e], w.group_size).to(dtype)
    return _dequant_w8_ref(w.qweight[e], w.scales[e], w.group_size).to(dtype)


def combine(pair_out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T*k, H] pair outputs -> [T, H]: each token's k outputs weighted and summed in fp32, rounded once."""
    T, k = weights.shape
    return (pair_out.view(T, k, pair_out.shape[-1]).float() * weights.unsqueeze(-1)).sum(dim=1).to(dtype)


def moe_experts_ref(x: torch.Tensor, gate_up: Experts, down: Experts, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """Plain torch: for every expert that got tokens, its MLP on them (in x's dtype, as HF's expert loop);
    CPU experts repacked at load (prepare_experts) go through ATen's packed matmuls."""
    T, k = ids.shape
    pair_out = x.new_empty(T * k, down.out_features)
    flat = ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        h = expert_matmul(x[pairs // k], gate_up, e)
        pair_out[pairs] = expert_matmul(silu_mul(h), down, e)
    return combine(pair_out, weights, x.dtype)


def moe_experts(x: torch.Tensor, gate_up: Experts, down: Experts, weights: torch.Tensor,
                ids: torch.Tensor, defer: bool = False):
    """x [T, H]; routing weights [T, k] (fp32) and expert ids [T, k] from route_topk -> [T, H] in x's dtype.
    defer (CUDA): a PendingSum for the next RMSNorm to finish (pending.py)."""
    if use_triton(x):
        from .moe_triton import moe_experts_triton

        return moe_experts_triton(x, gate_up, down, weights, ids, defer=defer)
    return moe_experts_ref(x, gate_up, down, weights, ids)
