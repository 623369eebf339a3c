"""One decoder layer in fp32 on the quantization device, run over calibration sequences.

It is the runtime's own DecoderLayer (so calibration sees exactly what the engine computes), loaded with
fp32 weights, plus the four entry points the quantizer needs: the attention block, the MLP block, and
the inputs of every linear. The residual stream `h` [T, hidden] holds all calibration sequences of one
length back to back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmconvert import kernels
from lmconvert.config import ModelConfig
from lmconvert.arch import LAYER_LINEARS as LINEARS
from lmconvert.runtime.layers import ExpertLinear, SparseMoE, causal_mask
from lmconvert.runtime.model import LAYER_MODULES, DecoderLayer

CHUNK_TOKENS = 2048  # MLP work is done in slices of this many tokens to bound the activations' memory


class CalibLayer:
    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device,
                 rope_cache: torch.Tensor, seqlen: int, quant: dict | None = None, index: int = 0):
        """quant: an engine quantization block to run the layer as the engine will (its tensors then in the
        engine layout: integer codes stay integers, the rest goes to fp32). index: the layer's (which FFN it has)."""
        self.cfg, self.device, self.rope_cache, self.seqlen = cfg, device, rope_cache, seqlen
        self.layer = DecoderLayer(cfg, quant or {}, index)
        self.layer.load({k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
                         for k, v in tensors.items()})
        # a mixture-of-experts layer: its experts are quantized apart (quant/src/moe_layer.py), the dict holds the rest
        self.moe = self.layer.mlp if isinstance(self.layer.mlp, SparseMoE) else None
        names = LINEARS[:2] if self.moe is not None else LINEARS
        self.linear = {name: self.layer.get_submodule(LAYER_MODULES[name]) for name in names}
        self.norm = {"input_norm": self.layer.input_norm, "post_attn_norm": self.layer.post_attn_norm}

    # ---- blocks ------------------------------------------------------------------------------------
    def attn_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.input_norm(h)

    def mlp_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attn_norm(h)

    def attention(self, x: torch.Tensor, capture_o_input: bool = False):
        """Attention block (qkv, rope, attention, o_proj) on normed input x [T, hidden] of whole sequences.

        The runtime's math, batched over the sequences into one causal SDPA call (much faster on CPU
        than the runtime's per-sequence masked loop, which serves ragged batches).
        """
        attn, cfg, L = self.layer.self_attn, self.cfg, self.seqlen
        T, n = x.shape[0], x.shape[0] // self.seqlen
        q, k, v = attn.qkv_proj(x).split(attn.split, dim=-1)
        q, k = q.reshape(T, cfg.num_heads, cfg.head_dim), k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        positions = torch.arange(L, device=x.device).repeat(n)
        q, k = kernels.apply_rope(q, k, positions, self.rope_cache)
        q, k, v = (t.reshape(n, L, -1, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = causal_mask(L, cfg.sliding_window, x.device) if cfg.sliding_window and cfg.sliding_window < L else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scale,
                                           enable_gqa=True)
        o = o.transpose(1, 2).reshape(T, cfg.q_size)
        out = attn.o_proj(o)
        return (out, o) if capture_o_input else out

    def mlp(self, x: torch.Tensor, capture_down_input: bool = False):
        """MLP block on normed input x [T, hidden], in token slices."""
        outs, downs = [], []
        for part in x.split(CHUNK_TOKENS):
            if self.moe is not None:
                outs.append(self.moe(part))
                continue
            act = kernels.silu_mul(self.layer.mlp.gate_up_proj(part))
            outs.append(self.layer.mlp.down_proj(act))
            if capture_down_input:
                downs.append(act)
        out = torch.cat(outs)
        return (out, torch.cat(downs) if downs else None) if capture_down_input else out

    def linear_inputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp forward of the layer on its input stream h: the input of every linear."""
        x_attn = self.attn_norm(h)
        attn, o_in = self.attention(x_attn, capture_o_input=True)
        x_mlp = self.mlp_norm(h + attn)
        del attn
        if self.moe is not None:  # experts take their routed rows of x_mlp
            return {"qkv_proj": x_attn, "o_proj": o_in}
        _, down_in = self.mlp(x_mlp, capture_down_input=True)
        return {"qkv_proj": x_attn, "o_proj": o_in, "gate_up_proj": x_mlp, "down_proj": down_in}

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """The layer's output stream for input stream h."""
        h = h + self.attention(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))

    # ---- weights -----------------------------------------------------------------------------------
    def weight(self, name: str) -> torch.Tensor:
        return self.linear[name].weight

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        self.linear[name].weight = w

    def v_rows(self) -> slice:
        return slice(self.cfg.q_size + self.cfg.kv_size, self.cfg.q_size + 2 * self.cfg.kv_size)

    def up_rows(self) -> slice:
        return slice(self.cfg.intermediate_size, 2 * self.cfg.intermediate_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Current fp32 tensors of the layer under engine suffix names (weights folded, not quantized)."""
        out = {}
        for name, module in self.layer.named_modules():
            for attr in ("weight", "bias"):
                t = getattr(module, attr, None)
                if isinstance(t, torch.Tensor) and name:
                    out[f"{_engine_name(name, module)}.{attr}"] = t
        return out


def _engine_name(module_path: str, module) -> str:
    """The inverse of runtime.model.LAYER_MODULES: "self_attn.q_norm" -> "q_norm", "mlp.shared_expert.down_proj"
    -> "shared_expert.down_proj", the MoE's "mlp.gate_up_proj" (an ExpertLinear) -> "experts.gate_up_proj"."""
    head, _, rest = module_path.partition(".")
    name = rest if head in ("self_attn", "mlp") else module_path
    return f"experts.{name}" if isinstance(module, ExpertLinear) else name
