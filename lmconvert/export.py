"""W4 engine -> HF checkpoint in the AutoAWQ GEMM or compressed-tensors pack-quantized layout (codes copied).

Fused linears are split back along N (qkv_proj -> q/k/v, gate_up_proj -> gate/up); a mixture-of-experts layer's
stacked experts go back to one linear per expert under the architecture's HF names, the router (and Qwen2-MoE's
shared_expert_gate) left in full precision as AutoAWQ and llm-compressor leave them. One safetensors shard per
decoder layer plus an index, so memory stays at one layer. Only integer zero points in 0..15 can be written
(the engine's fitted grids may hold fractional ones). AutoAWQ stores fp16 scales: an engine whose scales are
not exact in fp16 is refused; every other tensor keeps the engine's dtype. Engines with an act-order
`input_perm` are refused: AutoAWQ has no g_idx, and compressed-tensors dropped g_idx ("group" actorder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lmconvert.arch import FUSED_EXPERTS, FUSED_MODULES, get_arch
from lmconvert.engine import open_engine
from lmconvert.engine.writer import staging_dir, write_safetensors
from lmconvert.errors import UserError
from lmconvert.load.hparams import hf_moe_fields
from lmconvert.load.quantized_formats import AWQ_ORDER, pack_cols
from lmconvert.quant.primitives import unpack_int4

FORMATS = ("autoawq", "compressed-tensors")
HF_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FUSED = {**FUSED_MODULES, **FUSED_EXPERTS}
# what both formats leave in full precision: the routers ("gate" matches a module name's last part) and Qwen2-MoE's
# shared_expert_gate; compressed-tensors names them by regex
AWQ_NOT_CONVERTED = ["gate", "shared_expert_gate"]
CT_IGNORED = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]


def hf_config(cfg, quant_config: dict) -> dict:
    """ModelConfig -> a transformers config.json for the matching *ForCausalLM class."""
    arch = get_arch(cfg.arch)
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    out = {"architectures": [arch.hf_architectures[0]], "model_type": arch.model_types[0],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
           "rope_parameters": rope, "max_position_embeddings": cfg.max_position_embeddings,
           "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "dtype": HF_DTYPES[cfg.dtype],
           "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1
           else cfg.eos_token_ids, "quantization_config": quant_config}
    if arch.sliding_window:
        out["sliding_window"] = cfg.sliding_window
    return {**out, **hf_moe_fields(cfg)}


def quant_config(fmt: str, group_size: int, zero_point: bool, moe: bool = False) -> dict:
    if fmt == "autoawq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": AWQ_NOT_CONVERTED if moe else None}
    weights = {"num_bits": 4, "type": "int", "symmetric": not zero_point, "strategy": "group",
               "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": CT_IGNORED if moe else ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def split_sizes(cfg) -> dict[str, list[int]]:
    """Each fused engine module's parts' output sizes."""
    return {"qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size], "gate_up_proj": [cfg.intermediate_size] * 2,
            "experts.gate_up_proj": [cfg.moe_intermediate_size] * 2,
            "shared_expert.gate_up_proj": [cfg.shared_expert_intermediate_size] * 2}


def per_expert(module: str, t: torch.Tensor) -> list[torch.Tensor]:
    """A module's tensor as the list of what one HF module holds: experts' carry a leading expert dim."""
    return list(t) if module.startswith("experts.") else [t]


def module_tensors(fmt: str, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, zero_point: bool, where: str):
    """One linear, engine orientation (q [K, N], scales/zeros [K/G, N]) -> the format's tensors (suffix -> tensor)."""
    if fmt == "autoawq":
        s16 = scales.to(torch.float16)
        if not torch.equal(s16.to(scales.dtype), scales):
            raise UserError(f"{where}: scales are not exact in fp16, which AutoAWQ stores; export compressed-tensors")
        return {"qweight": pack_cols(q, AWQ_ORDER), "qzeros": pack_cols(zeros.to(torch.int32), AWQ_ORDER),
                "scales": s16.contiguous()}
    K, N = q.shape
    if not zero_point and not torch.all(zeros == 8):
        raise UserError(f"{where}: the engine says symmetric but a zero point is not 8")
    out = {"weight_packed": pack_cols(q.t()), "weight_scale": scales.t().contiguous(),
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if zero_point:  # signed zero point + 8 is the engine's, packed along N
        z = zeros.t().to(torch.int32)
        pad = (-N) % 8
        z = torch.cat([z, torch.zeros(pad, z.shape[1], dtype=torch.int32)]) if pad else z
        out["weight_zero_point"] = pack_cols(z.t()).t().contiguous()
    return out


def export(src: str | os.PathLike, fmt: str, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the W4 engine at src as an HF checkpoint in `fmt` (autoawq | compressed-tensors) at dst."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    engine = open_engine(src)
    cfg, quant = engine.config, engine.config.quantization
    if quant.get("bits") != 4:
        raise UserError(f"{src} is not a W4 engine: only W4 engines can be exported to {fmt}")
    if cfg.lm_head_quantization:
        raise UserError(f"{src} has a quantized lm_head (--quant-lm-head), which {fmt} checkpoints keep in 16 bits; "
                        "quantize without --quant-lm-head to export")
    G = quant["group_size"]
    arch = get_arch(cfg.arch)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(dst.absolute())
    try:
        zero_point = bool(quant.get("zero_point", True))
        n = cfg.num_layers + 1
        weight_map: dict[str, str] = {}

        def write(k: int, tensors: dict[str, torch.Tensor]) -> None:
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(tensors, tmp / name)
            weight_map.update(dict.fromkeys(tensors, name))

        write(0, {arch.hf_name(k): v for k, v in engine.global_tensors().items()})
        for i in range(cfg.num_layers):
            write(i + 1, layer_export(engine.layer_tensors(i), i, cfg, arch, fmt, G, zero_point))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config = hf_config(cfg, quant_config(fmt, G, zero_point, bool(cfg.num_experts)))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(engine.generation_config, indent=2))
        engine.save_tokenizer(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def layer_export(tensors: dict[str, torch.Tensor], i: int, cfg, arch, fmt: str, G: int, zero_point: bool) -> dict:
    """Engine tensors of layer i -> HF-named tensors of the format."""
    out, sizes = {}, split_sizes(cfg)
    permuted = sorted(k.rsplit(".", 1)[0] for k in tensors if k.endswith(".input_perm"))
    if permuted:
        raise UserError(f"layer {i} {permuted[0]}: the engine holds an act-order input permutation (imported GPTQ "
                        "desc_act), which neither AutoAWQ nor compressed-tensors pack-quantized can store")
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}

    def hf_names(part: str, suffix: str = "weight") -> list[str]:
        """The HF name of `part`'s tensor, one per expert for an expert linear."""
        name = arch.hf_name(f"layers.{i}.{part}.weight").removesuffix(".weight") + f".{suffix}"
        return [name.format(e=e) for e in range(cfg.num_experts)] if part.startswith("experts.") else [name]

    for name, t in tensors.items():
        module, kind = name.rsplit(".", 1)
        if kind in ("qweight", "scales", "zeros"):
            continue
        parts = FUSED.get(module)  # split along N: dim 0 of a bias, the out-features dim of a weight
        pieces = t.split(sizes[module], dim=0 if t.dim() == 1 else -2) if parts else [t]
        for part, piece in zip(parts or [module], pieces):
            for hf, value in zip(hf_names(part, kind), per_expert(module, piece)):
                out[hf] = value.contiguous()
    for module in sorted(modules):
        zeros = tensors[f"{module}.zeros"].float()
        if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 15:
            raise UserError(f"layer {i} {module}: zero points are not integers in 0..15 (a fitted grid), which "
                            "neither AutoAWQ nor compressed-tensors can store: quantize with --integer-zeros to export")
        parts = FUSED.get(module, (module,))
        prefixes = [[name.removesuffix(".weight") for name in hf_names(part)] for part in parts]  # [part][expert]
        linears = zip(per_expert(module, tensors[f"{module}.qweight"]), per_expert(module, tensors[f"{module}.scales"]),
                      per_expert(module, zeros))
        for e, (qweight, s, z) in enumerate(linears):
            q = unpack_int4(qweight)
            splits = sizes.get(module, [q.shape[1]])
            for names, qq, ss, zz in zip(prefixes, q.split(splits, 1), s.split(splits, 1), z.split(splits, 1)):
                for suffix, v in module_tensors(fmt, qq, ss, zz, zero_point, names[e]).items():
                    out[f"{names[e]}.{suffix}"] = v
    return out
