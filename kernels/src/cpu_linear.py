"""Packed CPU matmuls for W4 / W8 engines: ATen's weight-only int4 / int8 kernels (those torchao and gpt-fast
use on CPU), fed from the engine layouts repacked once at load.

They unpack a tile at a time in registers, so a decode step reads only the packed bytes; the torch reference in
quant_linear.py dequantizes whole matrices on every call (exact, 10-20x slower). Both are fast with bf16 / fp16
activations (AVX512-BF16 / AMX); fp32 activations take ATen's scalar loop, still without a whole-matrix copy.

Layouts (told apart from the engine's by dtype / rank, so a prepared tensor is never mistaken for an engine one):
- W4: qweight uint8 [N, K/2] (ATen's int4 CPU pack), scales [K/G, N, 2] = (scale, offset) pairs with
  w = (q - 8) * scale + offset, i.e. offset = (8 - zero) * scale for the engine's (q - zero) * scale.
- W8 per output channel: qweight int8 [N, K] (the engine's [K, N] transposed), scales [N].
ATen's kernels take group sizes 32..256, N a multiple of 16, and K a multiple of 32 (int8: other K crash or
round wrongly); other shapes keep the engine layout and the reference.
"""

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


def w4_packable(K: int, N: int, group_size: int) -> bool:
    return group_size in INT4_GROUP_SIZES and K % group_size == 0 and K % 32 == 0 and N % 16 == 0


def w8_packable(K: int, N: int, group_size: int) -> bool:
    return group_size == K and K % 32 == 0  # per output channel only: ATen's int8 kernel has one scale a row


def is_packed_w4(qweight: torch.Tensor) -> bool:
    return qweight.dtype == torch.uint8


def is_packed_w8(scales: torch.Tensor) -> bool:
    return scales.dim() == 1


def pack_w4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """codes int32 [K, N] (0..15), scales / zeros [K/G, N] -> (qweight uint8 [N, K/2], scale-offset [K/G, N, 2])."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 2)
    offsets = (8 - zeros.float()) * scales.float()
    return packed, torch.stack([scales.float(), offsets], dim=-1).to(scales.dtype).contiguous()


def pack_w8(codes: torch.Tensor, scales: torch.Tensor):
    """codes int8 [K, N], scales [1, N] -> (int8 [N, K], scales [N])."""
    return codes.t().contiguous(), scales.reshape(-1).contiguous()


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


def _finish(y: torch.Tensor, x: torch.Tensor, bias) -> torch.Tensor:
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


# A batch-1 decode step's fp GEMVs (SmolLM2 bf16: 270 MB a token) stream from memory; inside the compiled step,
# spelled as multiply-and-sum, inductor fuses each into one vectorized C++ reduction over the weight rows, which
# streams faster than oneDNN's M = 1 kernel (SmolLM2 bf16 decode: 70 vs 46 tok/s on 2 EPYC cores). ATen's packed
# int8 / int4 kernels stay faster than the same spelled out for quantized weights (the INT8 head: 80-94 vs 113).
def streams_as_reduction(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.dim() == 2 and x.shape[0] == 1


def reduction_linear(x, weight, bias=None):
    """x [1, K] @ weight [N, K]^T with fp32 sums, in x's dtype."""
    y = (x.float() * weight.float()).sum(-1).unsqueeze(0).to(x.dtype)
    return y if bias is None else y + bias


def w4_linear(x, qweight, scale_offsets, group_size, bias=None):
    """x [..., K] @ packed W4 -> [..., N] in x's dtype (the scales' dtype must be x's)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_flat(x, scale_offsets.dtype), qweight, group_size, scale_offsets)
    return _finish(y, x, bias)


def w8_linear(x, qweight, scales, bias=None):
    """x [..., K] @ packed W8 -> [..., N] in x's dtype."""
    return _finish(torch.ops.aten._weight_int8pack_mm(_flat(x, scales.dtype), qweight, scales), x, bias)
