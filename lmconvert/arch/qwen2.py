from lmconvert.arch import Arch, register

# Qwen2 / Qwen2.5: the llama table plus biases on q, k and v.
QWEN2 = register(Arch(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    qkv_bias=True,
    hf_layer_extra={f"{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in "qkv"},
    gguf_layer_extra={f"{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"},
))
