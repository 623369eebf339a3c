from lmconvert.arch import Arch, register

# Qwen3: the llama table plus per-head RMSNorm on q and k, no biases.
QWEN3 = register(Arch(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    qk_norm=True,
    hf_layer_extra={"q_norm.weight": "self_attn.q_norm.weight", "k_norm.weight": "self_attn.k_norm.weight"},
    gguf_layer_extra={"q_norm.weight": "attn_q_norm.weight", "k_norm.weight": "attn_k_norm.weight"},
))
