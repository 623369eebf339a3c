"""Readers for pre-quantized linears: AutoAWQ GEMM, GPTQ (v1 / v2) and compressed-tensors pack-quantized.

Each reader turns one source linear into a `W4Source` in the engine orientation (input dim K first), copying
the integer codes and zero points bit for bit. Layouts (all 4-bit, nibble i = bits 4i..4i+3 of an int32):
  AutoAWQ GEMM   qweight [K, N/8], qzeros [K/G, N/8]: nibble i of word c holds column 8c + AWQ_ORDER[i];
                 scales [K/G, N] fp16; W = (q - z) * s
  GPTQ           qweight [K/8, N]: nibble j of word r = row 8r + j (the engine's own packing);
                 qzeros [K/G, N/8]: nibble j of word c = column 8c + j; scales [K/G, N]; g_idx [K] group per row;
                 format "gptq" (v1) stores z - 1, so z = nibble + 1 (1..16); "gptq_v2" stores z
  pack-quantized weight_packed [N, K/8]: nibble j of word c = column 8c + j, holding the signed code + 8;
                 weight_scale [N, K/G] (group) or [N, 1] (channel); weight_zero_point int32 [N/8, K/G] packed
                 along N, signed zero point + 8 (asymmetric only; symmetric means 0); W = (q - z) * s with
                 signed q, z, which is the engine's (q + 8) - (z + 8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmconvert.errors import UserError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_UNORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in nibble AWQ_UNORDER[j]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass
class W4Source:
    """One quantized linear, engine orientation: W[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n]."""

    q: torch.Tensor  # int32 [K, N], 0..15
    scales: torch.Tensor  # [K // G, N], the source's dtype
    zeros: torch.Tensor  # float32 [K // G, N], integer zero points
    group_size: int  # G (K for one group per output channel)
    g_idx: torch.Tensor | None = None  # int [K]: group of each input row when not k // G (GPTQ act-order)


@dataclass
class FormatInfo:
    method: str  # engine `quantization.method`
    group_size: int  # source group size, -1 = one group per output channel
    zero_point: bool


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C, 8] with [..., j] = nibble j (bits 4j..4j+3)."""
    return (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS) & 0xF


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int [R, C, 8] in 0..15 -> int32 [R, C], value j in nibble j."""
    return (values.to(torch.int32) << _SHIFTS).sum(dim=-1, dtype=torch.int32)


def unpack_cols(packed: torch.Tensor, order=None) -> torch.Tensor:
    """int32 [R, C/8] packed along the last dim -> int32 [R, C] (order: the AWQ column order, or None)."""
    nib = unpack_nibbles(packed)
    if order is not None:
        nib = nib[..., list(AWQ_UNORDER)]
    return nib.reshape(packed.shape[0], -1)


def pack_cols(values: torch.Tensor, order=None) -> torch.Tensor:
    """Inverse of unpack_cols: int [R, C] in 0..15 -> int32 [R, C/8]."""
    v = values.reshape(values.shape[0], -1, 8)
    if order is not None:
        v = v[..., list(AWQ_ORDER)]
    return pack_nibbles(v)


def _expect(t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{what} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def _bits4(qcfg: dict, name: str) -> None:
    bits = qcfg.get("bits", qcfg.get("w_bit", 4))
    if bits != 4:
        raise UserError(f"{name} checkpoint with {bits}-bit weights: only 4-bit can be imported")


# --- AutoAWQ GEMM ---

def awq_info(qcfg: dict) -> FormatInfo:
    _bits4(qcfg, "AWQ")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise UserError(f"AWQ version {version!r}: only the GEMM packing can be imported")
    group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    return FormatInfo("awq-import", group, bool(qcfg.get("zero_point", True)))


def read_awq(get, prefix: str, K: int, N: int, info: FormatInfo) -> W4Source:
    G = K if info.group_size <= 0 else info.group_size
    q = unpack_cols(_expect(get(f"{prefix}.qweight"), (K, N // 8), f"{prefix}.qweight"), AWQ_ORDER)
    scales = _expect(get(f"{prefix}.scales"), (K // G, N), f"{prefix}.scales")
    zeros = unpack_cols(_expect(get(f"{prefix}.qzeros"), (K // G, N // 8), f"{prefix}.qzeros"), AWQ_ORDER)
    return W4Source(q, scales, zeros.float(), G)


# --- GPTQ ---

def gptq_info(qcfg: dict) -> FormatInfo:
    _bits4(qcfg, "GPTQ")
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UserError(f"GPTQ checkpoint format {fmt!r}: only 'gptq' and 'gptq_v2' can be imported")
    return FormatInfo("gptq-import" if fmt == "gptq" else "gptq_v2-import", int(qcfg.get("group_size", 128)),
                      not qcfg.get("sym", True))


def read_gptq(get, prefix: str, K: int, N: int, info: FormatInfo, has) -> W4Source:
    G = K if info.group_size <= 0 else info.group_size
    packed = _expect(get(f"{prefix}.qweight"), (K // 8, N), f"{prefix}.qweight")
    q = unpack_nibbles(packed).permute(0, 2, 1).reshape(K, N)  # nibble j of row r -> row 8r + j
    scales = _expect(get(f"{prefix}.scales"), (K // G, N), f"{prefix}.scales")
    zeros = unpack_cols(_expect(get(f"{prefix}.qzeros"), (K // G, N // 8), f"{prefix}.qzeros")).float()
    if info.method == "gptq-import":
        zeros = zeros + 1  # v1 stores z - 1 (AutoGPTQ's convention)
    g_idx = get(f"{prefix}.g_idx").to(torch.int64) if has(f"{prefix}.g_idx") else None
    return W4Source(q, scales, zeros, G, g_idx)


# --- compressed-tensors pack-quantized ---

def ct_weights_args(qcfg: dict) -> dict:
    """The one weight scheme of a W4A16 pack-quantized config (several identical config groups are fine)."""
    groups = qcfg.get("config_groups") or {}
    schemes = []
    for name, group in groups.items():
        fmt = group.get("format") or qcfg.get("format")
        if fmt != "pack-quantized":
            raise UserError(f"compressed-tensors format {fmt!r} in {name}: only 'pack-quantized' can be imported")
        if group.get("input_activations") or group.get("output_activations"):
            raise UserError(f"compressed-tensors {name} quantizes activations: only weight-only W4A16 can be imported")
        w = group.get("weights") or {}
        schemes.append({k: w.get(k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size")})
    if not schemes:
        raise UserError("compressed-tensors config has no config_groups")
    if any(s != schemes[0] for s in schemes):
        raise UserError("compressed-tensors config groups with different weight schemes cannot be imported")
    return schemes[0]


def ct_info(qcfg: dict) -> FormatInfo:
    w = ct_weights_args(qcfg)
    if w["num_bits"] != 4 or (w["type"] or "int") != "int":
        raise UserError(f"compressed-tensors {w['num_bits']}-bit {w['type']} weights: only 4-bit int can be imported")
    if w["strategy"] not in ("group", "channel"):
        raise UserError(f"compressed-tensors strategy {w['strategy']!r}: only 'group' and 'channel' can be imported")
    group = int(w["group_size"]) if w["strategy"] == "group" else -1
    return FormatInfo("compressed-tensors-import", group, not w["symmetric"])


def read_ct(get, prefix: str, K: int, N: int, info: FormatInfo, has) -> W4Source:
    G = K if info.group_size <= 0 else info.group_size
    shape = get(f"{prefix}.weight_shape").tolist() if has(f"{prefix}.weight_shape") else [N, K]
    if [int(s) for s in shape] != [N, K]:
        raise UserError(f"{prefix}.weight_shape is {shape}, expected {[N, K]}")
    q = unpack_cols(_expect(get(f"{prefix}.weight_packed"), (N, K // 8), f"{prefix}.weight_packed")).t()
    scales = _expect(get(f"{prefix}.weight_scale"), (N, K // G), f"{prefix}.weight_scale").t()
    if not info.zero_point:
        zeros = torch.full(scales.shape, 8.0)
    else:
        zp = get(f"{prefix}.weight_zero_point")
        if zp.dtype == torch.int32 and tuple(zp.shape) == ((N + 7) // 8, K // G):  # packed along N
            zeros = unpack_nibbles(zp).permute(0, 2, 1).reshape(-1, K // G)[:N].t().float()
        else:  # older releases kept the signed zero points unpacked
            zeros = _expect(zp, (N, K // G), f"{prefix}.weight_zero_point").t().float() + 8
    g_idx = get(f"{prefix}.weight_g_idx").to(torch.int64) if has(f"{prefix}.weight_g_idx") else None
    return W4Source(q.contiguous(), scales.contiguous(), zeros.contiguous(), G, g_idx)


FORMATS = {"awq": awq_info, "gptq": gptq_info, "compressed-tensors": ct_info}


def format_info(qcfg: dict) -> tuple[str, FormatInfo]:
    """config.json quantization_config -> (format key, FormatInfo); UserError for anything not importable."""
    method = str(qcfg.get("quant_method", "")).lower().replace("_", "-")
    if method not in FORMATS:
        raise UserError(f"quantization_config.quant_method {qcfg.get('quant_method')!r} cannot be imported: "
                        f"supported are {', '.join(FORMATS)}")
    return method, FORMATS[method](qcfg)

