"""Random-weight models at real sizes, for benchmarks where no weights exist (`convert --from-config`).

The model source yields fp weights, or W4 / W8 tensors directly in the engine's quantized layouts
(random codes, plausible scales), so a Qwen3-8B-sized W4 engine needs no fp copy at any point.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmconvert.arch import ATTENTION_LINEARS, DENSE_MLP_LINEARS, EXPERT_LINEARS, ROUTER, SHARED_EXPERT_LINEARS, get_arch
from lmconvert.config import ModelConfig, with_quantized_head
from lmconvert.errors import UserError
from lmconvert.presets import PRESETS


def config_from(spec: str, dtype: str = "bf16") -> ModelConfig:
    """A preset name (qwen3-8b, ...) or a path to an HF config.json."""
    if spec.lower() in PRESETS:
        return ModelConfig(**PRESETS[spec.lower()], dtype=dtype)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--from-config: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    from lmconvert.arch import arch_for_model_type
    from lmconvert.load.hparams import hf_model_config

    raw = json.loads(path.read_text())
    config = hf_model_config(arch_for_model_type(raw.get("model_type"), raw.get("architectures")), raw, {})
    config.dtype = dtype
    return config


class RandomModel:
    """A model source (see lmconvert.engine) with seeded random weights; quant = {} or {"bits": 4|8, "group_size": G},
    with "quantize_lm_head": True for a quantized (INT8 per-channel) lm_head too."""

    def __init__(self, config: ModelConfig, quant: dict | None = None, seed: int = 0, device: str = "cpu"):
        self.quant = dict(quant or {})
        quantized_head = bool(self.quant.pop("quantize_lm_head", False))
        if self.quant:
            self.quant = {"method": "random", "zero_point": self.quant["bits"] == 4,
                          "modules_not_converted": ["lm_head"], **self.quant}
            if quantized_head:
                self.quant = with_quantized_head(self.quant)
        elif quantized_head:
            raise UserError("a quantized lm_head needs --w4 or --w8")
        self.config = config
        self.config.quantization = self.quant
        self.generation_config = {"eos_token_id": config.eos_token_ids}
        self.seed, self.device = seed, device
        self.path = Path(f"random-{config.arch}")

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + salt)

    def _normal(self, shape, std: float, gen) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32) * std
        return t.to(self.config.torch_dtype)

    def _linear(self, out_f: int, in_f: int, gen, quant: dict | None = None, experts: int = 0) -> dict[str, torch.Tensor]:
        """quant: the linear's block (default: the layers'); experts: stack that many copies on a leading dim."""
        quant = self.quant if quant is None else quant
        lead = (experts,) if experts else ()
        std = in_f**-0.5
        bits, dtype = quant.get("bits"), self.config.torch_dtype
        if bits is None:
            return {"weight": self._normal((*lead, out_f, in_f), std, gen)}
        G = quant.get("group_size") or in_f
        if in_f % G:
            raise UserError(f"group size {G} does not divide the input dim {in_f}")
        scales = torch.full((*lead, in_f // G, out_f), std / (4.6 if bits == 4 else 73.0), dtype=dtype,
                            device=self.device)
        if bits == 8:
            q = torch.randint(-127, 128, (*lead, in_f, out_f), generator=gen, device=self.device, dtype=torch.int8)
            return {"qweight": q, "scales": scales}
        words = torch.randint(-2**31, 2**31 - 1, (*lead, in_f // 8, out_f), generator=gen, device=self.device,
                              dtype=torch.int32)
        return {"qweight": words, "scales": scales, "zeros": torch.full_like(scales, 8.0)}

    def global_tensors(self) -> dict[str, torch.Tensor]:
        c, gen = self.config, self._gen(-1)
        out = {"embed_tokens.weight": self._normal((c.vocab_size, c.hidden_size), 1.0, gen),
               "norm.weight": torch.ones(c.hidden_size, dtype=c.torch_dtype, device=self.device)}
        if "lm_head" in self.quant:  # its own block (with_quantized_head)
            head = self._linear(c.vocab_size, c.hidden_size, gen, self.quant["lm_head"])
            out.update({f"lm_head.{k}": v for k, v in head.items()})
        elif not c.tie_word_embeddings:
            out["lm_head.weight"] = self._normal((c.vocab_size, c.hidden_size), c.hidden_size**-0.5, gen)
        return out

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        c, gen = self.config, self._gen(i)
        ones = lambda n: torch.ones(n, dtype=c.torch_dtype, device=self.device)  # noqa: E731
        shapes = {"qkv_proj": (c.q_size + 2 * c.kv_size, c.hidden_size), "o_proj": (c.hidden_size, c.q_size),
                  "gate_up_proj": (2 * c.intermediate_size, c.hidden_size),
                  "down_proj": (c.hidden_size, c.intermediate_size),
                  "experts.gate_up_proj": (2 * c.moe_intermediate_size, c.hidden_size),
                  "experts.down_proj": (c.hidden_size, c.moe_intermediate_size),
                  "shared_expert.gate_up_proj": (2 * c.shared_expert_intermediate_size, c.hidden_size),
                  "shared_expert.down_proj": (c.hidden_size, c.shared_expert_intermediate_size)}
        out = {"input_norm.weight": ones(c.hidden_size), "post_attn_norm.weight": ones(c.hidden_size)}
        moe = c.is_moe_layer(i)
        shared = SHARED_EXPERT_LINEARS if moe and c.shared_expert_intermediate_size else ()
        for name in ATTENTION_LINEARS + (EXPERT_LINEARS + shared if moe else DENSE_MLP_LINEARS):
            experts = c.num_experts if name in EXPERT_LINEARS else 0
            out.update({f"{name}.{k}": v for k, v in self._linear(*shapes[name], gen, experts=experts).items()})
        if moe:
            out[ROUTER] = self._normal((c.num_experts, c.hidden_size), c.hidden_size**-0.5, gen)
        if shared:
            out["shared_expert_gate.weight"] = self._normal((1, c.hidden_size), c.hidden_size**-0.5, gen)
        if c.qkv_bias:
            out["qkv_proj.bias"] = self._normal((c.q_size + 2 * c.kv_size,), 0.02, gen)
        if c.qk_norm:
            out["q_norm.weight"], out["k_norm.weight"] = ones(c.head_dim), ones(c.head_dim)
        return out

    def load_tokenizer(self):
        return byte_tokenizer()

    def save_tokenizer(self, dst: Path) -> None:
        byte_tokenizer().save_pretrained(dst)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + an end token): random models still take text prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", chat_template=(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"))


def check_arch(requested: str, config: ModelConfig) -> None:
    if requested != "auto" and get_arch(requested).name != config.arch:
        raise UserError(f"architecture mismatch: asked for {requested!r} but the config is {config.arch!r}")
