from lmconvert.arch import Arch, register
from lmconvert.arch.qwen2 import QWEN2
from lmconvert.arch.qwen3 import QWEN3

# Mixture-of-experts families: a dense family's table plus where the router and each expert's linears live.
_QWEN_EXPERTS = {f"experts.{p}.weight": f"mlp.experts.{{e}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}

# Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3's attention, 128 experts top-8; dense MLP on `mlp_only_layers`.
QWEN3_MOE = register(Arch(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe", "qwen3moe"),  # HF, GGUF
    qk_norm=True,
    hf_layer_extra=QWEN3.hf_layer_extra,
    gguf_layer_extra=QWEN3.gguf_layer_extra,
    hf_router="mlp.gate.weight",
    hf_expert=_QWEN_EXPERTS,
))
# Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases), top-k weights not renormalized,
# plus a shared expert every token goes through.
QWEN2_MOE = register(Arch(
    name="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe", "qwen2moe"),  # HF, GGUF
    qkv_bias=True,
    hf_layer_extra=QWEN2.hf_layer_extra,
    gguf_layer_extra=QWEN2.gguf_layer_extra,
    hf_router="mlp.gate.weight",
    hf_expert=_QWEN_EXPERTS,
    gguf_moe_renormalize=False,
    shared_expert=True,
))
# Mixtral: Mistral's attention, 8 experts top-2, routing weights always renormalized. llama.cpp writes it as a
# "llama" GGUF with an expert count (GGUFCheckpoint tells the two apart).
MIXTRAL = register(Arch(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    sliding_window=True,
    gguf_permute_qk=True,
    hf_router="block_sparse_moe.gate.weight",
    hf_expert={f"experts.{p}.weight": f"block_sparse_moe.experts.{{e}}.{w}.weight"
               for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))},
    moe_renormalize=True,
))
