"""Pre-quantized HF checkpoints (AutoAWQ GEMM, GPTQ, compressed-tensors pack-quantized) read straight into the
engine's W4 layout: integer codes, zero points and scales are copied, never dequantized and requantized, so
the engine's dequantized weights are bit-identical to the source's (readers and layouts: quantized_formats.py).

The engine has one group size for all linears and groups of contiguous input rows, so:
- a source group G (or one group per channel) becomes the largest of 128/64/32 dividing it, scale rows repeated;
- GPTQ act-order (`g_idx`): if every aligned block of G rows lies in one group, its scales are reordered;
  otherwise the input rows are sorted by group. For down_proj that is absorbed exactly into gate/up's output
  columns; q/k/v, o_proj and gate/up get an `input_perm` tensor, gathered from the input at run time (fused
  siblings share one input, so their g_idx must agree, as GPTQ's same-Hessian orders do).

Mixture-of-experts layers (qwen3_moe, qwen2_moe, mixtral): each expert's gate/up/down is read like a dense MLP's
and the per-expert engine tensors are stacked on a leading expert dim (`experts.gate_up_proj.qweight` [E, K/8, 2I],
...), the layout lmconvert's own W4 MoE engines have. The router and Qwen2-MoE's `shared_expert_gate` must be
full precision (as AutoAWQ / GPTQ / llm-compressor leave them); the shared expert is a dense MLP. An expert's
act-order down_proj is folded into its gate/up rows; its gate/up cannot be sorted (experts have no input_perm).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmconvert.arch import FUSED_MODULES
from lmconvert.errors import UserError
from lmconvert.load.hf import HFCheckpoint, read_json
from lmconvert.load.hparams import text_config
from lmconvert.load.quantized_formats import W4Source, format_info, read_awq, read_ct, read_gptq

ENGINE_GROUP_SIZES = (128, 64, 32)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# canonical prefixes of a MoE layer's FFN linears: the routed experts ("{e}" in their HF names) and the shared one
EXPERTS, SHARED = "experts.", "shared_expert."


def quantization_config(root: Path) -> dict | None:
    if not (root / "config.json").is_file():
        return None
    cfg = read_json(root / "config.json")
    cfg = {**cfg, **text_config(cfg)}
    return cfg.get("quantization_config")


class QuantizedHFCheckpoint(HFCheckpoint):
    """An HF checkpoint whose decoder linears are 4-bit; `layer_tensors(i, dtype)` yields engine W4 tensors."""

    def __init__(self, root: Path, arch: str = "auto"):
        super().__init__(root, arch)
        self.format, self.info = format_info(quantization_config(root))
        c = self.config
        in_dims = {"q_proj": c.hidden_size, "k_proj": c.hidden_size, "v_proj": c.hidden_size, "o_proj": c.q_size,
                   "gate_proj": c.hidden_size, "up_proj": c.hidden_size, "down_proj": c.intermediate_size}
        out_dims = {"q_proj": c.q_size, "k_proj": c.kv_size, "v_proj": c.kv_size, "o_proj": c.hidden_size,
                    "gate_proj": c.intermediate_size, "up_proj": c.intermediate_size, "down_proj": c.hidden_size}
        self.shapes = {m: (in_dims[m], out_dims[m]) for m in LINEARS}
        for prefix, inter in ((EXPERTS, c.moe_intermediate_size), (SHARED, c.shared_expert_intermediate_size)):
            if inter:
                self.shapes.update({f"{prefix}gate_proj": (c.hidden_size, inter),
                                    f"{prefix}up_proj": (c.hidden_size, inter),
                                    f"{prefix}down_proj": (inter, c.hidden_size)})
        # input sizes of the linears this checkpoint has (a MoE model without dense layers has no dense MLP)
        dims = list(c.linear_input_dims.values())
        sources = [K if self.info.group_size <= 0 else self.info.group_size for K in dims]
        if self.info.group_size > 0 and any(K % self.info.group_size for K in dims):
            raise UserError(f"group size {self.info.group_size} does not divide every linear's input size")
        fits = [g for g in ENGINE_GROUP_SIZES if all(s % g == 0 for s in sources)]
        if not fits:
            raise UserError(f"group size {self.info.group_size} cannot be expressed with the engine's group sizes "
                            f"{', '.join(map(str, ENGINE_GROUP_SIZES))}")
        self.group_size = fits[0]
        self.config.quantization = {"method": self.info.method, "bits": 4, "group_size": self.group_size,
                                    "zero_point": self.info.zero_point, "modules_not_converted": ["lm_head"],
                                    "source_group_size": self.info.group_size}

    def source_name(self, canonical: str) -> str:
        return self.arch.hf_name(canonical)

    def read_linear(self, i: int, module: str, e: int | None = None) -> W4Source:
        """One source linear as a W4Source; module is canonical ("q_proj", "experts.down_proj", ...), e the expert."""
        K, N = self.shapes[module]
        prefix = self.source_name(f"layers.{i}.{module}.weight").removesuffix(".weight").replace("{e}", str(e))
        if f"{prefix}.weight" in self.files:
            raise UserError(f"{prefix} is not quantized in {self.path}: every decoder linear must be 4-bit")
        get, has = self.raw_tensor, lambda name: name in self.files
        if self.format == "awq":
            return read_awq(get, prefix, K, N, self.info)
        if self.format == "gptq":
            return read_gptq(get, prefix, K, N, self.info, has)
        return read_ct(get, prefix, K, N, self.info, has)

    def full_precision(self, i: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A tensor the engine keeps in its dtype (norms, biases, the router); refused when the source quantized it."""
        source = self.source_name(f"layers.{i}.{name}")
        base = source.removesuffix(".weight")
        if source not in self.files and any(f"{base}.{t}" in self.files for t in ("qweight", "weight_packed")):
            raise UserError(f"{base} is quantized in {self.path}: the engine keeps it in {dtype} (the router and "
                            "shared_expert_gate are never quantized); re-quantize with it left out")
        return self.get(f"layers.{i}.{name}").to(dtype)

    def layer_tensors(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Engine tensors of decoder layer i: fp norms/biases/router cast to dtype, linears in the W4 layout."""
        moe = self.config.is_moe_layer(i)
        linear = {f"{m}.weight" for m in self.shapes}
        out = {s: self.full_precision(i, s, dtype) for s in self.arch.layer_names(moe) if s not in linear}
        lin = {m: self.read_linear(i, m) for m in ATTENTION}
        mlps = {"": [{m: self.read_linear(i, m) for m in MLP}]} if not moe else {
            EXPERTS: [{m: self.read_linear(i, EXPERTS + m, e) for m in MLP} for e in range(self.config.num_experts)],
            **({SHARED: [{m: self.read_linear(i, SHARED + m) for m in MLP}]}
               if self.config.shared_expert_intermediate_size else {})}
        attn = {"qkv_proj": FUSED_MODULES["qkv_proj"], "o_proj": ("o_proj",)}
        for module, parts in attn.items():
            perm = sort_shared_input(lin, parts, f"layer {i} {module}")
            if perm is not None:
                out[f"{module}.input_perm"] = perm.to(torch.int32)
        for m, src in lin.items():
            lin[m] = contiguous_groups(src, f"layer {i} {m}")
        out.update(self.engine_w4(lin.pop("o_proj"), "o_proj", i, dtype))
        if all(f"{p}.bias" in out for p in FUSED_MODULES["qkv_proj"]):  # qwen2's q/k/v biases, rows like the weights
            out["qkv_proj.bias"] = torch.cat([out.pop(f"{p}.bias") for p in FUSED_MODULES["qkv_proj"]])
        out.update(self.fuse(lin, FUSED_MODULES["qkv_proj"], "qkv_proj", i, dtype))
        for prefix, experts in mlps.items():
            per_expert = [self.mlp_tensors(mlp, prefix, i, e if prefix == EXPERTS else None, dtype)
                          for e, mlp in enumerate(experts)]
            if prefix == EXPERTS:  # stacked on a leading expert dim, like lmconvert's quantized MoE engines
                out.update({k: torch.stack([t[k] for t in per_expert]) for k in per_expert[0]})
            else:
                out.update(per_expert[0])
        return out

    def mlp_tensors(self, lin: dict[str, W4Source], prefix: str, i: int, e: int | None,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Engine W4 tensors of one SwiGLU MLP (dense, one expert, or the shared expert): `{prefix}gate_up_proj.*`,
        `{prefix}down_proj.*` and, except for an expert, `{prefix}gate_up_proj.input_perm` for act-order."""
        where = f"layer {i} {prefix}{'' if e is None else f'{e}.'}"
        permute_down_proj(lin, where)
        perm = sort_shared_input(lin, MLP[:2], f"{where}gate_up_proj") if e is None else None
        if e is not None and not all(aligned_groups(lin[m], f"{where}{m}") for m in MLP[:2]):
            raise UserError(f"{where.rstrip('. ')}: GPTQ act-order g_idx on an expert's gate/up_proj cannot be imported "
                            "(the engine's experts have no input permutation); re-quantize with desc_act=False or "
                            "static_groups=True")
        out = {} if perm is None else {f"{prefix}gate_up_proj.input_perm": perm.to(torch.int32)}
        for m, src in lin.items():
            lin[m] = contiguous_groups(src, f"{where}{m}")
        out.update(self.engine_w4(lin.pop("down_proj"), f"{prefix}down_proj", i, dtype))
        out.update(self.fuse(lin, MLP[:2], f"{prefix}gate_up_proj", i, dtype))
        return out

    def fuse(self, lin: dict[str, W4Source], parts: tuple[str, ...], fused: str, i: int,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
        srcs = [lin[p] for p in parts]
        if len({s.group_size for s in srcs}) > 1:
            raise UserError(f"layer {i}: {'/'.join(parts)} have different group sizes, cannot fuse into {fused}")
        merged = W4Source(torch.cat([s.q for s in srcs], 1), torch.cat([s.scales for s in srcs], 1),
                          torch.cat([s.zeros for s in srcs], 1), srcs[0].group_size)
        return self.engine_w4(merged, fused, i, dtype)

    def engine_w4(self, src: W4Source, name: str, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from lmconvert.quant.primitives import pack_int4

        repeat = src.group_size // self.group_size
        scales = src.scales.repeat_interleave(repeat, dim=0).to(dtype)
        if not torch.equal(scales.to(src.scales.dtype), src.scales.repeat_interleave(repeat, dim=0)):
            raise UserError(f"layer {i} {name}: the {src.scales.dtype} scales are not exact in the engine dtype "
                            f"{dtype}; convert with --dtype fp32 or the checkpoint's dtype")
        zeros = src.zeros.repeat_interleave(repeat, dim=0).to(dtype)
        return {f"{name}.qweight": pack_int4(src.q), f"{name}.scales": scales.contiguous(),
                f"{name}.zeros": zeros.contiguous()}


def aligned_groups(src: W4Source, where: str) -> bool:
    """True when there is no g_idx or each aligned block of G input rows lies in one group."""
    if src.g_idx is None:
        return True
    K, G = src.q.shape[0], src.group_size
    g = src.g_idx
    if g.shape != (K,) or g.min() < 0 or g.max() >= src.scales.shape[0]:
        raise UserError(f"{where}: g_idx has a bad shape or range")
    blocks = g.view(K // G, G)
    return torch.equal(blocks, blocks[:, :1].expand_as(blocks))


def contiguous_groups(src: W4Source, where: str) -> W4Source:
    """Drop g_idx when each aligned block of G rows lies in one source group (scale rows reordered to match)."""
    if src.g_idx is None:
        return src
    if not aligned_groups(src, where):  # only after sorting by a fused sibling's g_idx that differs from this one
        raise UserError(f"{where}: act-order g_idx differs from that of the linears fused with it, which share "
                        "its input; re-quantize with desc_act=False or static_groups=True")
    rows = src.g_idx.view(-1, src.group_size)[:, 0]
    return W4Source(src.q, src.scales[rows], src.zeros[rows], src.group_size)


def group_order(src: W4Source, where: str) -> torch.Tensor:
    """The input-row permutation that sorts rows by group (stable), checked to give groups of G rows."""
    n = src.scales.shape[0]
    if not torch.equal(torch.bincount(src.g_idx, minlength=n), torch.full((n,), src.group_size)):
        raise UserError(f"{where}: g_idx groups do not all hold {src.group_size} rows")
    return torch.argsort(src.g_idx, stable=True)


def permute_rows(src: W4Source, perm: torch.Tensor) -> W4Source:
    g = src.g_idx if src.g_idx is not None else torch.arange(src.q.shape[0]) // src.group_size
    return W4Source(src.q[perm], src.scales, src.zeros, src.group_size, g[perm])


def sort_shared_input(lin: dict[str, W4Source], parts: tuple[str, ...], where: str) -> torch.Tensor | None:
    """Act-order on linears that read one input: sort all their rows by the first one's groups; the perm is
    returned for the engine's input_perm (the runtime gathers x[..., perm]). None when no sort is needed."""
    unsorted = [p for p in parts if not aligned_groups(lin[p], f"{where} ({p})")]
    if not unsorted:
        return None
    perm = group_order(lin[unsorted[0]], f"{where} ({unsorted[0]})")
    for p in parts:
        lin[p] = permute_rows(lin[p], perm)
    return perm


def permute_down_proj(lin: dict[str, W4Source], where: str) -> None:
    """Act-order down_proj: sort its input rows by group and permute gate/up's output columns alike. Exact and
    free at run time (no input_perm): down_proj's input channels are gate/up's output channels."""
    down = lin["down_proj"]
    if aligned_groups(down, f"{where} down_proj"):
        return
    perm = group_order(down, f"{where} down_proj")
    lin["down_proj"] = permute_rows(down, perm)
    for m in ("gate_proj", "up_proj"):
        s = lin[m]
        lin[m] = W4Source(s.q[:, perm], s.scales[:, perm], s.zeros[:, perm], s.group_size, s.g_idx)
