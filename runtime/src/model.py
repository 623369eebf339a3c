"""One llama-family decoder for every architecture; the engine config's flags switch its parts.

forward() takes the step's tokens flattened over the batch (`input_ids`, `positions`: [T]); per-sequence
boundaries and the KV cache layout come from runtime.context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmconvert import kernels
from lmconvert.devices import release_free_heap
from lmconvert.config import ModelConfig
from lmconvert.errors import UserError
from lmconvert.runtime.layers import MLP, Attention, Linear, RMSNorm, SparseMoE

# engine suffix (before ".weight" / ".qweight" / ...) -> module path inside a DecoderLayer
LAYER_MODULES = {
    "input_norm": "input_norm",
    "post_attn_norm": "post_attn_norm",
    "qkv_proj": "self_attn.qkv_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
    "router": "mlp.router",
    "experts.gate_up_proj": "mlp.gate_up_proj",
    "experts.down_proj": "mlp.down_proj",
    "shared_expert.gate_up_proj": "mlp.shared_expert.gate_up_proj",
    "shared_expert.down_proj": "mlp.shared_expert.down_proj",
    "shared_expert_gate": "mlp.shared_expert_gate",
}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: dict, index: int = 0):
        super().__init__()
        self.input_norm = RMSNorm(cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, quant)
        self.post_attn_norm = RMSNorm(cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg, quant) if cfg.is_moe_layer(index) else MLP(quant)

    def forward(self, positions, hidden, residual, rope_cache):
        if residual is None:
            residual = hidden
            hidden = self.input_norm(hidden)
        else:
            hidden, residual = self.input_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rope_cache)
        hidden, residual = self.post_attn_norm(hidden, residual)
        return self.mlp(hidden, defer=True), residual  # the next RMSNorm finishes split-K / expert sums

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: engine suffix names ("qkv_proj.weight", "o_proj.qweight", ...) of this layer."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            module, attr = name.rsplit(".", 1)  # "experts.down_proj.qweight" -> "experts.down_proj", "qweight"
            grouped.setdefault(module, {})[attr] = t
        for module, attrs in grouped.items():
            target = self.get_submodule(LAYER_MODULES[module])
            if isinstance(target, Linear):
                target.load(attrs)
            else:
                target.weight = attrs["weight"]


def own_small_views(module: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy what `module` kept of `source` (one layer file's tensors, one memory map) when that is under half of
    it: once a quantized layer's linears are repacked, its norm weights (a few KB) would keep every page of the
    file resident for nothing. An fp engine's weights, used in place, stay views of the file."""
    in_file = {t.data_ptr() for t in source.values()}
    kept = [(m, name, t) for m in module.modules() for name, t in vars(m).items()
            if isinstance(t, torch.Tensor) and t.data_ptr() in in_file]
    if 2 * sum(t.nbytes for _, _, t in kept) < sum(t.nbytes for t in source.values()):
        for m, name, t in kept:
            setattr(m, name, t.clone())


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        quant = cfg.quantization or {}
        self.layers = nn.ModuleList(DecoderLayer(cfg, quant, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.lm_head_quantization)
        self.embed_tokens = None
        self.rope_cache = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed_tokens)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, self.rope_cache)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def load_weights(self, source, device: torch.device, dtype: torch.dtype) -> None:
        """Copy weights from a model source (engine or converted checkpoint) one layer at a time."""

        def place(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        glob = {k: place(v) for k, v in source.global_tensors().items()}
        self.embed_tokens = glob["embed_tokens.weight"]
        self.norm.weight = glob["norm.weight"]
        head = {k.split(".", 1)[1]: v for k, v in glob.items() if k.startswith("lm_head.")}
        if self.config.lm_head_quantization and "qweight" not in head:
            raise UserError(f"{getattr(source, 'path', 'the model')}: its config has a quantized lm_head, its "
                            "globals hold no lm_head.qweight")
        self.lm_head.load(head or {"weight": self.embed_tokens})
        for i, layer in enumerate(self.layers):
            tensors = source.layer_tensors(i)
            layer.load({k: place(v) for k, v in tensors.items()})
            if device.type == "cpu":
                own_small_views(layer, tensors)
                del tensors
                # repacking's temporaries, freed into the heap: back to the OS before the next layer's (else the
                release_free_heap()  # heap keeps them all and peak RSS doubles the weights)
        cfg = self.config
        self.rope_cache = kernels.build_rope_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                                   cfg.rope_scaling, device)
