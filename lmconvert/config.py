"""Normalized model hyper-parameters: what every stage after the loaders sees."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from lmconvert.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
W4_GROUP_SIZES = (128, 64, 32)  # what the W4 kernels take; largest first: the default is the largest that fits


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass(slots=True)
class ModelConfig:
    """Everything the runtime needs to build the decoder; written to the engine's config.json."""

    arch: str  # registered name: qwen3 / qwen2 / llama / mistral
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF's rope_scaling dict (llama3, linear, ...) or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    dtype: str = "bf16"  # weights' dtype in the engine (bf16 / fp16 / fp32)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization: dict = field(default_factory=dict)  # empty for fp engines
    # mixture of experts (num_experts 0: a dense model); dense_layers: layers whose FFN is a dense MLP anyway
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum 1
    dense_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert (0: none)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def linear_input_dims(self) -> dict[str, int]:
        """Input size of every kind of linear the decoder layers have (engine names)."""
        dims = {"qkv_proj": self.hidden_size, "o_proj": self.q_size}
        if len(self.moe_layers) < self.num_layers:
            dims.update({"gate_up_proj": self.hidden_size, "down_proj": self.intermediate_size})
        if self.num_experts:
            dims.update({"experts.gate_up_proj": self.hidden_size, "experts.down_proj": self.moe_intermediate_size})
        if self.shared_expert_intermediate_size:
            dims.update({"shared_expert.gate_up_proj": self.hidden_size,
                         "shared_expert.down_proj": self.shared_expert_intermediate_size})
        return dims

    @property
    def lm_head_quantization(self) -> dict | None:
        """The quantized lm_head's own block (`quantization["lm_head"]`, engine format 3), None for a 16-bit head."""
        return (self.quantization or {}).get("lm_head")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.num_experts:  # a dense engine's config.json stays readable by readers without MoE
            for name in MOE_FIELDS:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"engine config has unknown fields: {', '.join(sorted(unknown))}")
        try:
            cfg = cls(**d)
        except TypeError as e:  # a required field missing
            raise UserError(f"engine config: {e}") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise UserError for a config no engine can have (a hand-edited or damaged config.json): checked when
        an engine is written and when it is opened, so a bad value never reaches the runtime."""
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"engine config: {name} must be a positive integer, got {value!r}")
        if self.num_experts:
            _check_moe(self)
        if self.head_dim % 2:
            raise UserError(f"engine config: head_dim must be even (rotary embeddings pair its dims), got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_finite(value) or value <= 0:
                raise UserError(f"engine config: {name} must be a positive number, got {value!r}")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings <= 0:
            raise UserError("engine config: max_position_embeddings must be a positive integer, got "
                            f"{self.max_position_embeddings!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise UserError(f"engine config: sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise UserError(f"engine config: rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if self.bos_token_id is not None and (not _is_int(self.bos_token_id) or self.bos_token_id < 0):
            raise UserError(f"engine config: bos_token_id must be a token id or null, got {self.bos_token_id!r}")
        if not isinstance(self.eos_token_ids, list) or not all(_is_int(i) and i >= 0 for i in self.eos_token_ids):
            raise UserError(f"engine config: eos_token_ids must list token ids, got {self.eos_token_ids!r}")
        for name in ("tie_word_embeddings", "qkv_bias", "qk_norm", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"engine config: {name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.quantization, dict):
            raise UserError(f"engine config: quantization must be an object, got {self.quantization!r}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"engine config: {self.num_kv_heads} KV heads do not divide {self.num_heads} heads")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise UserError(f"engine config: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for where, block in (("quantization", self.quantization), ("quantization.lm_head", self.lm_head_quantization)):
            if block:
                _check_quant_block(where, block, self.linear_input_dims if where == "quantization" else {})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A JSON number the runtime can compute with: no bool, NaN, infinity or integer too large for a float."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value) and abs(value) < 2**63


def check_generation_config(gen: dict, where: str) -> None:
    """UserError for a generation_config.json whose sampling defaults or token ids the runtime cannot use."""
    if not isinstance(gen, dict):
        raise UserError(f"{where}: generation config must be a JSON object")
    for name, low, high in (("temperature", 0, math.inf), ("top_p", 0, 1), ("repetition_penalty", 0, math.inf)):
        value = gen.get(name, 1.0)
        if not _is_finite(value) or not (low <= value <= high) or \
                (name != "temperature" and value == 0):
            raise UserError(f"{where}: generation config {name} must be a number in "
                            f"{'[' if name == 'temperature' else '('}{low}, {high}], got {value!r}")
    top_k = gen.get("top_k", 0)
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise UserError(f"{where}: generation config top_k must be a non-negative integer, got {top_k!r}")
    if not isinstance(gen.get("do_sample", True), bool):
        raise UserError(f"{where}: generation config do_sample must be true or false, got {gen['do_sample']!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(name)
        ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
        if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
            raise UserError(f"{where}: generation config {name} must be a token id"
                            f"{' or a list of them' if name == 'eos_token_id' else ''}, got {value!r}")


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The shape a floating-point tensor of this canonical or engine name ("layers.3.q_proj.weight",
    "layers.3.qkv_proj.weight", "embed_tokens.weight") must have under cfg; None for a name this does not know
    (quantized tensors, input_perm): loaders check every tensor they read against it."""
    H, V, D, q, kv, inter = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.q_size, cfg.kv_size,
                             cfg.intermediate_size)
    E, Im, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    suffix = name.split(".", 2)[2] if name.startswith("layers.") and name.count(".") >= 2 else name
    return {
        "embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "norm.weight": (H,),
        "input_norm.weight": (H,), "post_attn_norm.weight": (H,), "q_norm.weight": (D,), "k_norm.weight": (D,),
        "q_proj.weight": (q, H), "k_proj.weight": (kv, H), "v_proj.weight": (kv, H), "qkv_proj.weight": (q + 2 * kv, H),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "qkv_proj.bias": (q + 2 * kv,),
        "o_proj.weight": (H, q), "gate_proj.weight": (inter, H), "up_proj.weight": (inter, H),
        "gate_up_proj.weight": (2 * inter, H), "down_proj.weight": (H, inter),
        "router.weight": (E, H), "experts.gate_proj.weight": (E, Im, H), "experts.up_proj.weight": (E, Im, H),
        "experts.gate_up_proj.weight": (E, 2 * Im, H), "experts.down_proj.weight": (E, H, Im),
        "shared_expert.gate_proj.weight": (Is, H), "shared_expert.up_proj.weight": (Is, H),
        "shared_expert.gate_up_proj.weight": (2 * Is, H), "shared_expert.down_proj.weight": (H, Is),
        "shared_expert_gate.weight": (1, H),
    }.get(suffix)


def check_tensor(cfg: ModelConfig, name: str, tensor, where: str) -> None:
    """UserError unless tensor (of a known floating-point name) has the shape cfg gives it and a float dtype."""
    want = expected_shape(cfg, name)
    if want is None:
        return
    if tuple(tensor.shape) != want:
        raise UserError(f"{where}: tensor {name} has shape {list(tensor.shape)}, the config says {list(want)}")
    if not tensor.is_floating_point():
        raise UserError(f"{where}: tensor {name} has dtype {tensor.dtype}, expected floating point")


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "dense_layers",
              "shared_expert_intermediate_size")


def _check_moe(cfg: ModelConfig) -> None:
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"engine config: {name} must be a positive integer, got {value!r}")
    if cfg.num_experts_per_tok > cfg.num_experts:
        raise UserError(f"engine config: {cfg.num_experts_per_tok} experts per token of {cfg.num_experts} experts")
    if not isinstance(cfg.dense_layers, list) or any(not isinstance(i, int) or not 0 <= i < cfg.num_layers
                                                     for i in cfg.dense_layers):
        raise UserError(f"engine config: dense_layers must list layer indices, got {cfg.dense_layers!r}")


def _check_quant_block(where: str, block: dict, input_dims: dict[str, int]) -> None:
    if not isinstance(block, dict):
        raise UserError(f"engine config: {where} must be an object, got {block!r}")
    bits, group = block.get("bits"), block.get("group_size")
    if bits not in (4, 8):
        raise UserError(f"engine config: {where}.bits is {bits!r}; lmconvert runs 4 or 8")
    if group is None:
        return
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise UserError(f"engine config: {where}.group_size must be a positive integer or null, got {group!r}")
    for name, dim in input_dims.items():
        if dim % group:
            raise UserError(f"engine config: {where}.group_size {group} does not divide {name}'s input size {dim}")


def largest_group_size(cfg: ModelConfig, choices=W4_GROUP_SIZES) -> int | None:
    """The largest of choices dividing every linear's input size (None if none does)."""
    return next((g for g in choices if all(dim % g == 0 for dim in cfg.linear_input_dims.values())), None)


# A quantized lm_head is INT8 per output channel whatever the layers' bits, as llama.cpp keeps its output tensor
# above the layers' precision: on SmolLM2 a W4 g64 head cost +17% perplexity, an INT8 one +0.2% (docs/quantization.md).
LM_HEAD_QUANT = {"bits": 8, "group_size": None}


def with_quantized_head(block: dict) -> dict:
    """A `quantization` block whose lm_head is quantized (LM_HEAD_QUANT under the key "lm_head")."""
    return {**block, "modules_not_converted": [], "lm_head": dict(LM_HEAD_QUANT)}
