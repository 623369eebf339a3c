"""Architecture registry: each architecture is a small table of tensor names plus flags.

Names come in three vocabularies:
- source names (HF / GGUF), looked up through an Arch's tables;
- canonical per-module names ("layers.{i}.q_proj.weight"), what loaders hand to convert;
- engine names, where convert has fused q/k/v into qkv_proj and gate/up into gate_up_proj.
Quantization and the runtime only ever see engine names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmconvert.errors import UserError

# engine module -> canonical modules concatenated along the output dim, in this order
FUSED_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# the same for mixture-of-experts layers: every expert at once, and a shared expert (Qwen2-MoE)
FUSED_EXPERTS = {"experts.gate_up_proj": ("experts.gate_proj", "experts.up_proj"),
                 "shared_expert.gate_up_proj": ("shared_expert.gate_proj", "shared_expert.up_proj")}
# The linears of a decoder layer as the engine stores them (what quantization may replace).
LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ATTENTION_LINEARS = ("qkv_proj", "o_proj")
DENSE_MLP_LINEARS = ("gate_up_proj", "down_proj")
# A mixture-of-experts layer's FFN: a router [E, hidden] (never quantized) and every expert's linears stacked on
# a leading expert dim, [E, out, in] like nn.Linear's per expert.
EXPERT_LINEARS = ("experts.gate_up_proj", "experts.down_proj")
ROUTER = "router.weight"
# Qwen2-MoE adds an always-on shared expert (a dense SwiGLU MLP) scaled by sigmoid(shared_expert_gate x)
SHARED_EXPERT_LINEARS = ("shared_expert.gate_up_proj", "shared_expert.down_proj")
SHARED_EXPERT_NAMES = ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                       "shared_expert.down_proj.weight", "shared_expert_gate.weight")

# canonical name -> HF name; identical across the llama family
HF_GLOBALS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
HF_LAYER = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "o_proj.weight": "self_attn.o_proj.weight",
    "gate_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "down_proj.weight": "mlp.down_proj.weight",
}
ATTENTION_NAMES = ("input_norm.weight", "post_attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                   "o_proj.weight")
DENSE_MLP_NAMES = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
# canonical MoE names: per expert in HF checkpoints (stacked by the loader), already stacked in GGUF
EXPERT_NAMES = ("experts.gate_proj.weight", "experts.up_proj.weight", "experts.down_proj.weight")
GGUF_MOE = {
    "router.weight": "ffn_gate_inp.weight",
    "experts.gate_proj.weight": "ffn_gate_exps.weight",
    "experts.up_proj.weight": "ffn_up_exps.weight",
    "experts.down_proj.weight": "ffn_down_exps.weight",
    "shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
GGUF_GLOBALS = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER = {
    "input_norm.weight": "attn_norm.weight",
    "post_attn_norm.weight": "ffn_norm.weight",
    "q_proj.weight": "attn_q.weight",
    "k_proj.weight": "attn_k.weight",
    "v_proj.weight": "attn_v.weight",
    "o_proj.weight": "attn_output.weight",
    "gate_proj.weight": "ffn_gate.weight",
    "up_proj.weight": "ffn_up.weight",
    "down_proj.weight": "ffn_down.weight",
}


@dataclass(frozen=True)
class Arch:
    name: str
    hf_architectures: tuple[str, ...]  # config.json "architectures" values served
    model_types: tuple[str, ...]  # config.json "model_type" and GGUF general.architecture values
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: bool = False  # honour config.sliding_window
    gguf_permute_qk: bool = False  # llama.cpp stores llama q/k rows permuted for its rope layout
    hf_layer_extra: dict[str, str] = field(default_factory=dict)  # canonical suffix -> HF suffix
    gguf_layer_extra: dict[str, str] = field(default_factory=dict)
    # mixture of experts: the router's HF suffix and each expert linear's, "{e}" standing for the expert index
    hf_router: str | None = None
    hf_expert: dict[str, str] = field(default_factory=dict)  # canonical EXPERT_NAMES -> HF suffix with {e}
    moe_renormalize: bool = False  # renormalize the top-k routing weights when the config does not say
    gguf_moe_renormalize: bool = True  # the same for GGUF files (llama.cpp's default for the architecture)
    shared_expert: bool = False  # Qwen2-MoE: SHARED_EXPERT_NAMES beside the routed experts

    @property
    def moe(self) -> bool:
        return self.hf_router is not None

    def layer_names(self, moe_layer: bool = False) -> tuple[str, ...]:
        """Canonical per-layer tensor suffixes this architecture has (in a layer whose FFN is experts or not)."""
        ffn = (ROUTER, *EXPERT_NAMES, *(SHARED_EXPERT_NAMES if self.shared_expert else ())) if moe_layer \
            else DENSE_MLP_NAMES
        return ATTENTION_NAMES + ffn + tuple(self.hf_layer_extra)

    def hf_name(self, canonical: str) -> str:
        """The HF name of a canonical tensor; an expert tensor's has "{e}" for the expert index."""
        moe = {ROUTER: self.hf_router, **self.hf_expert, **_HF_SHARED_EXPERT} if self.moe else {}
        return _source_name(canonical, HF_GLOBALS, {**HF_LAYER, **self.hf_layer_extra, **moe}, "model.layers.{i}.")

    def gguf_name(self, canonical: str) -> str:
        return _source_name(canonical, GGUF_GLOBALS, {**GGUF_LAYER, **self.gguf_layer_extra, **GGUF_MOE}, "blk.{i}.")


_HF_SHARED_EXPERT = {name: f"mlp.{name}" for name in SHARED_EXPERT_NAMES}


def _source_name(canonical: str, globals_: dict, layer: dict, layer_prefix: str) -> str:
    if canonical in globals_:
        return globals_[canonical]
    _, i, suffix = canonical.split(".", 2)  # "layers", index, suffix
    return layer_prefix.replace("{i}", i) + layer[suffix]


_REGISTRY: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} registered twice")
    if not arch.hf_architectures or not arch.model_types:
        raise ValueError(f"architecture {arch.name!r} needs hf_architectures and model_types")
    _REGISTRY[arch.name] = arch
    return arch


def supported() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(name: str) -> Arch:
    if name not in _REGISTRY:
        raise UserError(f"unsupported architecture {name!r}; supported: {', '.join(supported())}")
    return _REGISTRY[name]


def arch_for_model_type(model_type: str | None, hf_architectures: list[str] | None = None) -> Arch:
    """Find the architecture a checkpoint declares (config model_type, or its architectures list)."""
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"the checkpoint's model_type must be a name, got {model_type!r:.80}")
    if hf_architectures is not None and (not isinstance(hf_architectures, list)
                                         or not all(isinstance(a, str) for a in hf_architectures)):
        raise UserError(f"the checkpoint's architectures must be a list of names, got {hf_architectures!r:.80}")
    for arch in _REGISTRY.values():
        if model_type in arch.model_types:
            return arch
    for arch in _REGISTRY.values():
        if set(hf_architectures or ()) & set(arch.hf_architectures):
            return arch
    declared = model_type or ", ".join(hf_architectures or ()) or "nothing"
    raise UserError(f"unsupported architecture {declared!r}; supported: {', '.join(supported())}")


def resolve_arch(requested: str, model_type: str | None, hf_architectures: list[str] | None = None) -> Arch:
    """The checkpoint's own architecture, checked against what the user asked for ('auto' accepts any)."""
    found = arch_for_model_type(model_type, hf_architectures)
    if requested != "auto":
        wanted = get_arch(requested)
        if wanted.name != found.name:
            raise UserError(f"architecture mismatch: asked for {wanted.name!r} but the checkpoint is {found.name!r}")
    return found


from lmconvert.arch import llama, moe, qwen2, qwen3  # noqa: E402,F401  (fill the registry)
