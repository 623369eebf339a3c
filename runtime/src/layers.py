"""Building blocks of the decoder. Math goes through lmconvert.kernels (Triton on CUDA, torch on CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmconvert import kernels
from lmconvert.kernels import cpu_linear
from lmconvert.runtime.context import get_context


class Linear(nn.Module):
    """y = x W^T + b with W held in full precision or in a quantized engine layout.

    `quant` is the engine's quantization block ({} for fp): bits 4 → W4A16 kernel, bits 8 → W8A16 kernel,
    bits 8 with activation_bits 8 (SmoothQuant) → per-token int8 activations and the int8 GEMM.
    An imported act-order linear also has `input_perm` [K]: its weight rows are sorted by quantization group,
    so the input columns are gathered in that order first.
    """

    def __init__(self, quant: dict | None = None):
        super().__init__()
        self.bits = (quant or {}).get("bits", 16)
        self.group_size = (quant or {}).get("group_size", 0)
        self.int8_act = (quant or {}).get("activation_bits", 16) == 8
        self.weight = self.qweight = self.scales = self.zeros = self.bias = self.input_perm = None

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            setattr(self, key, value)
        if self.bits == 8 and not self.group_size:  # per output channel: one group spanning K
            self.group_size = self.qweight.shape[0]
        # repack once into the kernels' layout (CUDA: Triton's; CPU: ATen's packed int4 / int8 where it fits)
        if self.bits == 4:
            self.qweight, self.scales, self.zeros = kernels.prepare_w4(self.qweight, self.scales, self.zeros, self.group_size)
        elif self.int8_act:
            self.qweight, self.scales = kernels.prepare_w8a8(self.qweight, self.scales)
        elif self.bits == 8:
            self.qweight, self.scales = kernels.prepare_w8(self.qweight, self.scales, self.group_size)

    def forward(self, x: torch.Tensor, defer: bool = False):
        """defer: the caller's next kernel takes a kernels.PendingSum (RMSNorm, SiLU-mul, RoPE + KV store),
        which a split-K W4/W8 GEMV returns instead of finishing its sums itself (kernels/src/pending.py)."""
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.bits == 4:
            return kernels.w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias, defer)
        if self.int8_act:
            return kernels.w8a8_linear(x, self.qweight, self.scales, self.bias)
        if self.bits == 8:
            return kernels.w8a16_linear(x, self.qweight, self.scales, self.group_size, self.bias, defer)
        if cpu_linear.streams_as_reduction(x):  # the compiled CPU step at batch 1
            return cpu_linear.reduction_linear(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = None

    def forward(self, x, residual=None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


def causal_mask(n: int, sliding_window: int | None, device) -> torch.Tensor:
    """bool [n, n]: query i sees keys j <= i, and with a window only j > i - window (HF Mistral)."""
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if sliding_window:
        mask &= ~torch.ones_like(mask).tril(-sliding_window)
    return mask


def dense_causal_attention(q, k, v, cu_seqlens: list[int], scale: float, sliding_window: int | None):
    """Attention of whole sequences over themselves (no cache): q [T, H, D], k/v [T, Hkv, D]."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        n = end - start
        mask = causal_mask(n, sliding_window, q.device)
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)
    return out


class Attention(nn.Module):
    def __init__(self, cfg, quant: dict):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.split = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = Linear(quant)
        self.o_proj = Linear(quant)
        self.eps = cfg.rms_norm_eps
        self.q_norm = RMSNorm(cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.rms_norm_eps) if cfg.qk_norm else None
        # [num_blocks, block_size, Hkv, D], attached by the model runner; int8 KV adds (scale, zero) pools
        self.k_cache = self.v_cache = self.k_scales = self.v_scales = None

    def _qk_norm_weights(self):
        return (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)

    def forward(self, positions, x, rope_cache):
        T = x.shape[0]
        ctx = get_context()
        qkv = self.qkv_proj(x, defer=ctx.paged)  # paged: the fused RoPE + KV store finishes split-K sums
        if ctx.paged:  # one fused launch: q/k norm, RoPE, K/V into the cache
            q = kernels.rope_and_store(qkv, self.num_heads, positions, rope_cache, self.k_cache, self.v_cache,
                                       ctx.slot_mapping, *self._qk_norm_weights(), self.eps, self.k_scales,
                                       self.v_scales)
            o = kernels.paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.cu_seqlens_q,
                                        ctx.context_lens, self.scale, self.sliding_window, self.k_scales, self.v_scales,
                                        max_seqlen_q=ctx.max_query_len, decode_rows=ctx.decode_rows)
            return self.o_proj(o.reshape(T, -1), defer=True)  # the layer's next RMSNorm finishes it
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.apply_rope(q, k, positions, rope_cache)
        o = dense_causal_attention(q, k, v, ctx.cu_seqlens_q.tolist(), self.scale, self.sliding_window)
        return self.o_proj(o.reshape(T, -1))


class ExpertLinear(Linear):
    """Every expert's copy of one linear, stacked on a leading expert dim (engine layouts, kernels/src/moe.py).
    The MoE kernels read the engine layout as it is; on CPU quantized experts are repacked for ATen's packed
    matmuls (kernels.prepare_experts)."""

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            setattr(self, key, value.contiguous())
        if self.bits == 8 and not self.group_size:  # per output channel: one group spanning K
            self.group_size = self.qweight.shape[1]
        if self.bits != 16:
            packed = kernels.prepare_experts(self.experts)
            self.qweight, self.scales, self.zeros = packed.qweight, packed.scales, packed.zeros

    @property
    def experts(self) -> kernels.Experts:
        return kernels.Experts(self.bits, self.group_size, self.weight, self.qweight, self.scales, self.zeros)

    @property
    def out_features(self) -> int:
        return self.experts.out_features


class SparseMoE(nn.Module):
    """The FFN of a mixture-of-experts layer: a router picks num_experts_per_tok experts a token, whose SwiGLU
    MLPs' outputs are summed with the routing weights. The router stays in the engine dtype (never quantized:
    a flipped choice of expert costs more than any rounding)."""

    def __init__(self, cfg, quant: dict):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = Linear()
        self.gate_up_proj = ExpertLinear(quant)
        self.down_proj = ExpertLinear(quant)
        # Qwen2-MoE: a dense MLP every token goes through, scaled by sigmoid(shared_expert_gate x)
        self.shared_expert = MLP(quant) if cfg.shared_expert_intermediate_size else None
        self.shared_expert_gate = Linear() if cfg.shared_expert_intermediate_size else None

    def route(self, x):
        """(weights fp32 [T, k], expert ids [T, k]); logits in the model dtype, as HF's router computes them."""
        return kernels.route_topk(self.router(x), self.top_k, self.renormalize)

    def forward(self, x, defer: bool = False):
        """defer: as MLP (the decoder layer's next RMSNorm finishes the experts' fp32 sums); not with a shared
        expert, whose output is added here."""
        weights, ids = self.route(x)
        defer = defer and self.shared_expert is None
        out = kernels.moe_experts(x, self.gate_up_proj.experts, self.down_proj.experts, weights, ids, defer)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * kernels.take(self.shared_expert(x))
        return out


class MLP(nn.Module):
    def __init__(self, quant: dict):
        super().__init__()
        self.gate_up_proj = Linear(quant)
        self.down_proj = Linear(quant)

    def forward(self, x, defer: bool = True):
        # each output goes to a kernel that finishes split-K sums: SiLU-mul, the next RMSNorm
        return self.down_proj(kernels.silu_mul(self.gate_up_proj(x, defer=True)), defer=defer)
