"""HF config.json (+ generation_config.json) -> normalized ModelConfig."""

from __future__ import annotations

from lmconvert.arch import Arch
from lmconvert.config import DTYPE_NAMES, ModelConfig, parse_dtype
from lmconvert.errors import UserError


MAX_LAYERS = 100_000  # far beyond any model; a damaged count must not size a list


def text_config(cfg: dict) -> dict:
    """A multimodal wrapper's nested decoder config ({} when there is none)."""
    nested = cfg.get("text_config") or {}
    if not isinstance(nested, dict):
        raise UserError(f"config.json: text_config must be an object, got {type(nested).__name__}")
    return nested


def as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def merge_ids(*lists: list[int]) -> list[int]:
    return list(dict.fromkeys(i for ids in lists for i in ids))  # union, first-seen order


def split_rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" not in params:  # older configs, or rope_parameters keyed per layer type
        params = {**dict(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
    theta = float(params.pop("rope_theta"))
    if "type" in params:  # pre-4.45 spelling
        params.setdefault("rope_type", params.pop("type"))
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def checkpoint_dtype(cfg: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    try:
        return DTYPE_NAMES[parse_dtype(name)]
    except UserError:
        return "bf16"  # e.g. a float8 checkpoint: bf16 is the closest dtype the engine stores


def moe_fields(arch: Arch, cfg: dict) -> dict:
    """ModelConfig's mixture-of-experts fields from an HF config (none for a dense architecture)."""
    if not arch.moe:
        return {}
    layers = int(cfg["num_hidden_layers"])
    if not 0 < layers <= MAX_LAYERS:  # before a list as long as the layer count
        raise UserError(f"config.json: num_hidden_layers {layers} is not in 1..{MAX_LAYERS}")
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense_only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    return dict(
        num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        # Mixtral's experts are `intermediate_size` wide; Qwen's have their own size
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", arch.moe_renormalize)),
        dense_layers=[i for i in range(layers) if i in dense_only or (i + 1) % step],
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0) if arch.shared_expert else 0,
    )


def hf_moe_fields(cfg: ModelConfig) -> dict:
    """moe_fields' inverse: the HF config keys of a ModelConfig's experts (for a transformers model of its shape)."""
    if not cfg.num_experts:
        return {}
    if cfg.arch == "mixtral":  # experts are `intermediate_size` wide, renormalized always, no dense layers
        return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                "intermediate_size": cfg.moe_intermediate_size}
    shared = {"shared_expert_intermediate_size": cfg.shared_expert_intermediate_size} if cfg.arch == "qwen2_moe" else {}
    return {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
            "mlp_only_layers": list(cfg.dense_layers), "decoder_sparse_step": 1, **shared}


def hf_model_config(arch: Arch, cfg: dict, generation_config: dict) -> ModelConfig:
    cfg = {**cfg, **text_config(cfg)}  # multimodal wrappers nest the decoder's config
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta, scaling = split_rope(cfg)
        window = cfg.get("sliding_window") if arch.sliding_window else None
        config = ModelConfig(
            arch=arch.name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch.qkv_bias,
            qk_norm=arch.qk_norm,
            sliding_window=int(window) if window else None,
            dtype=checkpoint_dtype(cfg),
            bos_token_id=generation_config.get("bos_token_id", cfg.get("bos_token_id")),
            eos_token_ids=merge_ids(as_id_list(cfg.get("eos_token_id")),
                                    as_id_list(generation_config.get("eos_token_id"))),
            **moe_fields(arch, cfg),
        )
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # int(inf) overflows
        raise UserError(f"config.json is missing or has a bad hyper-parameter: {e}") from None
    config.check()
    return config
