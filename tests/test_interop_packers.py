"""Test-side writers of AutoAWQ GEMM and GPTQ checkpoints, written from the formats' documentation (autoawq and
gptqmodel do not install on this CPU-only torch), plus the compressed-tensors builder that uses the library.

Each returns the checkpoint dir and the reference dequantized weights {hf weight name: W [N, K] fp32}.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")
# what the packers quantize: every decoder linear, Mixtral's experts (w1 gate, w3 up, w2 down) included; never
# a router (`mlp.gate` / `block_sparse_moe.gate`) or Qwen2-MoE's shared_expert_gate, as AutoAWQ / GPTQ /
# llm-compressor leave them
QUANT_SUFFIXES = LINEAR_SUFFIXES + ("w1.weight", "w3.weight", "w2.weight")
AWQ_COLUMN_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column AWQ_COLUMN_ORDER[i]


def rtn(w: torch.Tensor, G: int, sym: bool, zmin: int = 0):
    """w [N, K] -> codes int32 [N, K] in 0..15, fp16 scales [N, K/G], integer zeros int32 [N, K/G] (>= zmin)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // G, G)
    if sym:
        s = (wg.abs().amax(-1) / 7).clamp(min=1e-6).half()
        z = torch.full_like(s, 8, dtype=torch.int32)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-6).half()
        z = torch.round(-lo / s.float()).clamp(zmin, 15).to(torch.int32)
    q = torch.round(wg / s.float().unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, 15).to(torch.int32).reshape(N, K)
    return q, s, z


def dequant(q, s, z, G):
    N, K = q.shape
    return ((q.reshape(N, K // G, G) - z.unsqueeze(-1)).float() * s.float().unsqueeze(-1)).reshape(N, K)


def awq_pack(v: torch.Tensor) -> torch.Tensor:
    """int [R, C] -> int32 [R, C/8] in the AutoAWQ GEMM column order."""
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int32)
    for i, col in enumerate(AWQ_COLUMN_ORDER):
        out |= v[:, col::8].to(torch.int32) << (4 * i)
    return out


def gptq_pack_rows(v: torch.Tensor) -> torch.Tensor:
    """int [K, N] -> int32 [K/8, N]: nibble j of word r is row 8r + j."""
    out = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int32)
    for j in range(8):
        out |= v[j::8].to(torch.int32) << (4 * j)
    return out


def gptq_pack_cols(v: torch.Tensor) -> torch.Tensor:
    """int [R, N] -> int32 [R, N/8]: nibble j of word c is column 8c + j."""
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int32)
    for j in range(8):
        out |= v[:, j::8].to(torch.int32) << (4 * j)
    return out


def _write(src: Path, dst: Path, tensors: dict, qcfg: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copyfile(f, dst / f.name)
    return dst


def write_awq(src: Path, dst: Path, G: int = 32, version: str = "gemm", not_convert: list | None = None):
    tensors, refs = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if not name.endswith(QUANT_SUFFIXES) or "layers" not in name:
            tensors[name] = w
            continue
        q, s, z = rtn(w, G, sym=False)
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.qweight": awq_pack(q.t()), f"{prefix}.qzeros": awq_pack(z.t()),
                        f"{prefix}.scales": s.t().contiguous()})
        refs[name] = dequant(q, s, z, G)
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": version,
            "modules_to_not_convert": not_convert}
    return _write(src, dst, tensors, qcfg), refs


def write_gptq(src: Path, dst: Path, G: int = 32, sym: bool = True, fmt: str = "gptq", bits: int = 4,
               act_order: tuple[str, ...] = (), seed: int = 0, shared: bool = True, perms: dict | None = None):
    """GPTQ with g_idx; modules whose name ends with an entry of act_order get a random act-order g_idx.

    As in GPTQ, act-order sorts a linear's input channels (by the Hessian diagonal, which fused siblings share):
    shared=True gives q/k/v one order and gate/up one order per layer. perms {suffix: perm} fixes an order.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors, refs, orders = {}, {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if not name.endswith(QUANT_SUFFIXES) or "layers" not in name:
            tensors[name] = w
            continue
        N, K = w.shape
        perm = torch.arange(K)
        if name.endswith(act_order):
            key = shared_input_key(name) if shared else name
            fixed = next((p for suffix, p in (perms or {}).items() if name.endswith(suffix)), None)
            perm = orders.setdefault(key, fixed if fixed is not None else torch.randperm(K, generator=gen))
        # act-order: groups are formed over the columns in the permuted order
        qp, s, z = rtn(w[:, perm], G, sym, zmin=1 if fmt == "gptq" else 0)
        q = torch.empty_like(qp)
        q[:, perm] = qp
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = torch.arange(K, dtype=torch.int32) // G
        ref = torch.empty(N, K)
        ref[:, perm] = dequant(qp, s, z, G)
        stored_z = z - 1 if fmt == "gptq" else z
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.qweight": gptq_pack_rows(q.t()), f"{prefix}.qzeros": gptq_pack_cols(stored_z.t()),
                        f"{prefix}.scales": s.t().contiguous(), f"{prefix}.g_idx": g_idx})
        refs[name] = ref
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": G, "desc_act": bool(act_order), "sym": sym,
            "checkpoint_format": fmt}
    return _write(src, dst, tensors, qcfg), refs


def shared_input_key(name: str) -> str:
    """Linears that read the same input map to one key: k/v_proj -> q_proj, up_proj -> gate_proj, w3 -> w1."""
    for sibling, first in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj"), ("w3", "w1")):
        name = name.replace(f".{sibling}.", f".{first}.")
    return name


def write_compressed_tensors(src: Path, dst: Path, G: int | None = 32, sym: bool = False) -> Path:
    """W4A16 pack-quantized written by the compressed-tensors library (min-max scales; G None = channel)."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group" if G else "channel", group_size=G)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, qc)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            N, K = w.shape
            wg = w.reshape(N, K // (G or K), G or K)
            scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zp.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copyfile(f, dst / f.name)
    return dst


def load_ct_dequantized(path: Path):
    """A compressed-tensors checkpoint loaded in transformers on CPU, weights decompressed."""
    import transformers
    from transformers import CompressedTensorsConfig

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def write_compressed_tensors_moe(src: Path, dst: Path, G: int | None = 32, sym: bool = False):
    """W4A16 pack-quantized, tensor by tensor through compressed-tensors' own compressor (transformers 5 holds
    MoE experts as fused 3D parameters, not the per-expert nn.Linear llm-compressor quantizes, so the
    whole-model path above does not reach them). Min-max scales; routers and shared_expert_gate left out
    (`ignore`, as llm-compressor's MoE recipes do). Returns the dir and the library-decompressed weights."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group" if G else "channel", group_size=G)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors, refs = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if not name.endswith(QUANT_SUFFIXES) or "layers" not in name:
            tensors[name] = w
            continue
        N, K = w.shape
        scale, zp = calculate_qparams(w.reshape(N, K // (G or K), G or K).amin(-1),
                                      w.reshape(N, K // (G or K), G or K).amax(-1), args)
        state = {"weight": w, "weight_scale": scale.to(w.dtype).reshape(N, -1),
                 "weight_zero_point": zp.reshape(N, -1)}
        packed = PackedQuantizationCompressor.compress(state, scheme)
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.{k}": v for k, v in packed.items() if k.startswith("weight_")})
        refs[name] = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"].float()
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=ignore)
    qcfg = {**qc.model_dump(), "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    return _write(src, dst, tensors, qcfg), refs
