"""Pre-quantized HF checkpoints (AutoAWQ GEMM, GPTQ, compressed-tensors pack-quantized) read straight into the
engine's W4 layout: integer codes, zero points and scales are copied, never dequantized and requantized, so
the engine's dequantized weights are bit-identical to the source's (readers and layouts: quantized_formats.py).

The engine has one group size for all linears and groups of contiguous input rows, so:
- a source group G (or one group per channel) becomes the largest of 128/64/32 dividing it, scale rows repeated;
- GPTQ act-order (`g_idx`): if every aligned block of G rows lies in one group, its scales are reordered;
  otherwise the input rows are sorted by group. For down_proj that is absorbed exactly into gate/up's output
  columns; q/k/v, o_proj and gate/up get an `input_perm` tensor, gathered from the input at run time (fused
  siblings share one input, so their g_idx must agree, as GPTQ's same-Hessian orders do).
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
# engine linears whose input rows may carry an act-order permutation (input_perm), with the source linears
# that read that input; down_proj's is absorbed into gate/up's output columns instead (permute_down_proj)
INPUTS = {"qkv_proj": FUSED_MODULES["qkv_proj"], "o_proj": ("o_proj",), "gate_up_proj": FUSED_MODULES["gate_up_proj"]}


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
        if self.arch.moe:
            raise UserError(f"{root}: importing a pre-quantized mixture-of-experts checkpoint ({self.format}) is not "
                            "supported yet; convert the full-precision model and quantize it with lmconvert")
        c = self.config
        in_dims = {"q_proj": c.hidden_size, "k_proj": c.hidden_size, "v_proj": c.hidden_size, "o_proj": c.q_size,
                   "gate_proj": c.hidden_size, "up_proj": c.hidden_size, "down_proj": c.intermediate_size}
        out_dims = {"q_proj": c.q_size, "k_proj": c.kv_size, "v_proj": c.kv_size, "o_proj": c.hidden_size,
                    "gate_proj": c.intermediate_size, "up_proj": c.intermediate_size, "down_proj": c.hidden_size}
        self.shapes = {m: (in_dims[m], out_dims[m]) for m in LINEARS}
        sources = [K if self.info.group_size <= 0 else self.info.group_size for K in in_dims.values()]
        if self.info.group_size > 0 and any(K % self.info.group_size for K in in_dims.values()):
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

    def read_linear(self, i: int, module: str) -> W4Source:
        K, N = self.shapes[module]
        prefix = self.source_name(f"layers.{i}.{module}.weight").removesuffix(".weight")
        if f"{prefix}.weight" in self.files:
            raise UserError(f"{prefix} is not quantized in {self.path}: every decoder linear must be 4-bit")
        get, has = self.raw_tensor, lambda name: name in self.files
        if self.format == "awq":
            return read_awq(get, prefix, K, N, self.info)
        if self.format == "gptq":
            return read_gptq(get, prefix, K, N, self.info, has)
        return read_ct(get, prefix, K, N, self.info, has)

    def layer_tensors(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Engine tensors of decoder layer i: fp norms/biases cast to dtype, linears in the W4 layout."""
        out = {s: self.get(f"layers.{i}.{s}").to(dtype) for s in self.arch.layer_names()
               if not s.endswith(".weight") or s.split(".")[0] not in LINEARS}
        lin = {m: self.read_linear(i, m) for m in LINEARS}
        permute_down_proj(lin, f"layer {i}")
        for module, parts in INPUTS.items():
            perm = sort_shared_input(lin, parts, f"layer {i} {module}")
            if perm is not None:
                out[f"{module}.input_perm"] = perm.to(torch.int32)
        for m, src in lin.items():
            lin[m] = contiguous_groups(src, f"layer {i} {m}")
        for m in ("o_proj", "down_proj"):
            out.update(self.engine_w4(lin.pop(m), m, i, dtype))
        for fused, parts in FUSED_MODULES.items():
            if all(f"{p}.bias" in out for p in parts):  # qwen2's q/k/v biases, rows like the weights
                out[f"{fused}.bias"] = torch.cat([out.pop(f"{p}.bias") for p in parts])
            srcs = [lin[p] for p in parts]
            if len({s.group_size for s in srcs}) > 1:
                raise UserError(f"layer {i}: {'/'.join(parts)} have different group sizes, cannot fuse into {fused}")
            merged = W4Source(torch.cat([s.q for s in srcs], 1), torch.cat([s.scales for s in srcs], 1),
                              torch.cat([s.zeros for s in srcs], 1), srcs[0].group_size)
            out.update(self.engine_w4(merged, fused, i, dtype))
        return out

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
