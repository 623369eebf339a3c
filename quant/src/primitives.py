"""Group quantization and int4 packing in plain torch: the on-disk contract and the reference path.

Engine layout of one quantized linear with input dim K, output dim N, group size G
(weights stored transposed, so that y = x @ W with W [K, N]):
  W4: qweight int32 [K // 8, N]   nibble j (bits 4j..4j+3) of qweight[r, n] holds q[8r + j, n] in 0..15
      scales  [K // G, N]          model dtype
      zeros   [K // G, N]          model dtype: zero points, integers from round-to-nearest (8 when symmetric),
                                   fractional where the AWQ grid fit chose so (kernels compute in fp32 anyway)
      W[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]
  W8: qweight int8 [K, N], scales [K // G, N] (G = K: per output channel), W = q * scales
"""

from __future__ import annotations

import torch

PACK = 8  # int4 values per int32
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[K, N] integers in 0..15 -> int32 [K // 8, N]."""
    K, N = q.shape
    assert K % PACK == 0, "K must be a multiple of 8"
    q = q.to(torch.int32).reshape(K // PACK, PACK, N)
    return (q << _SHIFTS.to(q.device).view(1, PACK, 1)).sum(dim=1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N] -> int32 [K, N] in 0..15."""
    R, N = packed.shape
    q = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, PACK, 1)) & 0xF
    return q.reshape(R * PACK, N)


def group_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip=1.0, dtype=torch.float32,
                 integer_zero: bool = True):
    """nn.Linear weight w [N, K] -> (scales, zeros) fp32 [N, K // G] per group of G input channels.

    Asymmetric: [min, max] mapped onto 0..2^bits-1. With integer_zero (classic RTN / AWQ) the range is
    widened to hold 0 and the zero point rounded; without, the zero point is free (a fractional
    -min / scale, like llama.cpp's stored minimum), so the grid spans exactly [min, max].
    Symmetric: absmax onto the signed range, zero point 2^(bits-1). `clip` (scalar or [N, K // G])
    shrinks the range before rounding. Scales and zeros are rounded to `dtype` (the engine's), as stored.
    """
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scales = (wg.abs().amax(dim=2) * clip / (half - 1)).clamp(min=1e-10).to(dtype).float()
        return scales, torch.full_like(scales, float(half))
    wmin, wmax = wg.amin(dim=2) * clip, wg.amax(dim=2) * clip
    if integer_zero:
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    scales = ((wmax - wmin) / qmax).clamp(min=1e-10).to(dtype).float()
    zeros = torch.round(-wmin / scales).clamp(0, qmax) if integer_zero else (-wmin / scales).to(dtype).float()
    return scales, zeros


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N, K] -> integer codes [N, K] (as float) in 0..2^bits-1 on the per-group grid."""
    N, K = w.shape
    G = K // scales.shape[1]
    wg = w.float().reshape(N, K // G, G)
    q = torch.round(wg / scales.unsqueeze(2) + zeros.unsqueeze(2)).clamp(0, 2**bits - 1)
    return q.reshape(N, K)


def grid_values(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Integer codes [N, K] -> the weights they stand for, fp32 [N, K]."""
    N, K = q.shape
    G = K // scales.shape[1]
    return ((q.reshape(N, K // G, G) - zeros.unsqueeze(2)) * scales.unsqueeze(2)).reshape(N, K)


ROW_CHUNK = 1024  # rows rounded at a time: keeps the temporaries of a large linear small


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip=1.0, dtype=torch.float32,
                  integer_zero: bool = True):
    """Round-trip w [N, K] through group quantization: what the engine will compute with, in fp32."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], ROW_CHUNK):
        scales, zeros = group_params(w[r:r + ROW_CHUNK], bits, group_size, symmetric, clip, dtype, integer_zero)
        out[r:r + ROW_CHUNK] = grid_values(round_to_grid(w[r:r + ROW_CHUNK], scales, zeros, bits), scales, zeros)
    return out


def snap_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N, K] rounded to nearest on a given grid, dequantized (fp32), a block of rows at a time."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], ROW_CHUNK):
        rows = slice(r, r + ROW_CHUNK)
        out[rows] = grid_values(round_to_grid(w[rows], scales[rows], zeros[rows], bits), scales[rows], zeros[rows])
    return out


def pack_w4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """Codes [N, K] and per-group scales/zeros [N, K // G] (nn.Linear orientation) -> engine W4 tensors."""
    return {"qweight": pack_int4(q.t()), "scales": scales.t().to(dtype).contiguous(),
            "zeros": zeros.t().to(dtype).contiguous()}


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """w [K, N] float -> (q int32 [K, N], scales [K//G, N], zeros [K//G, N]) in float32 (see group_params)."""
    scales, zeros = group_params(w.t(), bits, group_size, symmetric)
    q = round_to_grid(w.t(), scales, zeros, bits)
    return q.t().to(torch.int32), scales.t(), zeros.t()


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference dequantization of the W4 layout above -> W [K, N] in the scales' dtype."""
    q = unpack_int4(qweight)
    K = q.shape[0]
    s = scales.float().repeat_interleave(group_size, dim=0)[:K]
    z = zeros.float().repeat_interleave(group_size, dim=0)[:K]
    return ((q.float() - z) * s).to(scales.dtype)


def quantize_w4(w: torch.Tensor, group_size: int, symmetric: bool = False, dtype=torch.float16):
    """nn.Linear weight [N, K] -> (qweight, scales, zeros) in the W4 engine layout."""
    scales, zeros = group_params(w, 4, group_size, symmetric, dtype=dtype)
    return tuple(pack_w4(round_to_grid(w, scales, zeros, 4), scales, zeros, dtype).values())


def quantize_w8(w: torch.Tensor, group_size: int | None = None, dtype=torch.float16):
    """nn.Linear weight [N, K] -> (qweight int8 [K, N], scales [K//G, N]); symmetric."""
    wt = w.t().float()
    K, N = wt.shape
    G = group_size or K
    wg = wt.reshape(K // G, G, N)
    scales = (wg.abs().amax(dim=1) / 127).clamp(min=1e-10).to(dtype).float()  # round to the codes' stored scale
    q = torch.round(wg / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8).reshape(K, N)
    return q, scales.to(dtype)


def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    K = qweight.shape[0]
    s = scales.float().repeat_interleave(group_size, dim=0)[:K]
    return (qweight.float() * s).to(scales.dtype)
