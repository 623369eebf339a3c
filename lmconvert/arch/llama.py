from lmconvert.arch import Arch, register

# Llama (incl. llama3 rope scaling) and Mistral share one table; Mistral adds the sliding window.
LLAMA = register(Arch(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    gguf_permute_qk=True,
))
MISTRAL = register(Arch(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    sliding_window=True,
    gguf_permute_qk=True,
))
