"""Weight-only quantized linears: W4A16 (AWQ layout) and W8A16, y = x @ dequant(W) + bias.

Layouts (quant/primitives.py): W4 qweight int32 [K/8, N] (8 consecutive k per int32, so a row of int32s
is contiguous along N), scales/zeros [K/G, N]; W8 qweight int8 [K, N], scales [K/G, N].
Both kernels read the weight tile [BK, BN] coalesced along N, dequantize it in registers
((q - z) * s in fp32, rounded to the activation dtype, like the reference) and accumulate in fp32.

Two regimes, chosen by M (rows of x):
- decode (M <= 16): a GEMV. Grid = N tiles x SPLIT_K slices of K, so even N = 4096 fills every SM;
  each program reads its weight slice once and writes an fp32 partial, summed afterwards.
- prefill: a tiled tl.dot GEMM with grouped tile order (weight tiles stay in L2 across M tiles).
Block sizes divide the group size, so each weight tile has exactly one row of scales/zeros.
"""

import torch

from ._triton import INTERPRET, dot_acc, next_pow2, tl, triton, use_triton
from .autotune import Autotuner

DECODE_MAX_M = 16
_tuner = Autotuner()


def select_regime(M: int) -> str:
    return "decode" if M <= DECODE_MAX_M else "prefill"


def _dequant_w4_ref(qweight, scales, zeros, group_size):
    # Same arithmetic as primitives.dequantize_w4, without materialising repeated fp32 scales.
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, qweight.shape[1])
    K, N = q.shape
    qg = q.view(K // group_size, group_size, N).float()
    w = (qg - zeros.float().unsqueeze(1)) * scales.float().unsqueeze(1)
    return w.view(K, N).to(scales.dtype)


def _dequant_w8_ref(qweight, scales, group_size):
    K, N = qweight.shape
    w = qweight.view(K // group_size, group_size, N).float() * scales.float().unsqueeze(1)
    return w.view(K, N).to(scales.dtype)


def _matmul_ref(x, w, bias):
    y = x @ w.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias=None):
    return _matmul_ref(x, _dequant_w4_ref(qweight, scales, zeros, group_size), bias)


def w8a16_linear_ref(x, qweight, scales, group_size, bias=None):
    return _matmul_ref(x, _dequant_w8_ref(qweight, scales, group_size), bias)


@triton.jit
def _weight_tile(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, N, G, BITS: tl.constexpr):
    """Dequantized weight rows k0 + offs_k, columns offs_n, as fp32 [BK, BN]."""
    k = k0 + offs_k
    if BITS == 4:
        # 8 rows share one int32: the repeated addresses are served by L1, DRAM sees each byte once
        q = tl.load(qw_ptr + (k // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        q = (q >> ((k % 8) * 4)[:, None]) & 0xF
    else:
        q = tl.load(qw_ptr + k[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    g = k0 // G
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if BITS == 4:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        return (q.to(tl.float32) - z[None, :]) * s[None, :]
    return q.to(tl.float32) * s[None, :]


@triton.jit
def _decode_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, G, TILES_PER_SPLIT,
                   BITS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * TILES_PER_SPLIT * BLOCK_K
    k_end = tl.minimum(k_begin + TILES_PER_SPLIT * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, N, G, BITS)
        x = tl.load(x_ptr + offs_m[:, None] * K + k0 + offs_k[None, :], mask=(offs_m < M)[:, None], other=0.0)
        if BLOCK_M == 1:  # plain FMAs: no tensor-core padding for a single row
            acc += tl.sum(x.to(tl.float32).reshape(BLOCK_K, 1) * w, axis=0)[None, :]
        else:
            acc = dot_acc(x, w.to(x.dtype), acc, UPCAST)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _prefill_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, G,
                    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M consecutive M tiles walk the same N tiles, reusing dequant inputs from L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, N, G, BITS)
        acc = dot_acc(x, w.to(x.dtype), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _block_ks(G, K, choices):
    return [bk for bk in choices if G % bk == 0 and K % bk == 0] or [16]


def decode_candidates(M, N, K, G, device):
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps): split K until ~2 programs per SM."""
    out = []
    for bn in (64, 128, 256):
        for bk in _block_ks(G, K, (128, 64, 32))[:2]:
            tiles_k = K // bk
            split = max(1, min(tiles_k, -(-2 * _num_sms(device) // triton.cdiv(N, bn))))
            out.append((bn, bk, split, 4))
    return out


def prefill_candidates(M, N, K, G, device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if device.type != "cuda":
        return [(32, 32, _block_ks(G, K, (32,))[0], 4, 1)]
    out = []
    for bm, bn, warps in ((128, 128, 8), (128, 256, 8), (64, 128, 4), (128, 64, 4)):
        for bk in _block_ks(G, K, (64, 32))[:1]:
            for stages in (3, 4):
                out.append((bm, bn, bk, warps, stages))
    return out


def _launch(x2, qweight, scales, zeros, bias, G, bits, N):
    M, K = x2.shape
    regime = select_regime(M)
    bucket = M if regime == "decode" else min(next_pow2(M), 4096)  # prefill M varies per step: bucket it
    key = (regime, bucket, N, K, G, bits, x2.dtype, str(x2.device))
    args = dict(BITS=bits, HAS_BIAS=bias is not None, UPCAST=INTERPRET)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    if regime == "decode":
        block_m = 1 if M == 1 else 16

        def run(cfg):
            bn, bk, split, warps = cfg
            tiles = triton.cdiv(K // bk, split)
            split = triton.cdiv(K // bk, tiles)
            out = torch.empty(split, M, N, device=x2.device, dtype=torch.float32 if split > 1 else x2.dtype)
            _decode_kernel[(triton.cdiv(N, bn), split)](x2, qweight, scales, z, b, out, M, N, K, G, tiles, **args,
                                                      BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
            return out[0] if split == 1 else out.sum(0).to(x2.dtype)

        return run(_tuner.pick(key, decode_candidates(M, N, K, G, x2.device), run))

    def run(cfg):
        bm, bn, bk, warps, stages = cfg
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _prefill_kernel[grid](x2, qweight, scales, z, b, out, M, N, K, G, **args, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
        return out

    return run(_tuner.pick(key, prefill_candidates(M, N, K, G, x2.device), run))


def _linear_triton(x, qweight, scales, zeros, group_size, bias, bits):
    N = qweight.shape[1]
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], N)
    # quantize_w8 returns a transposed (strided) qweight; .contiguous() is free when already contiguous
    zeros = zeros.contiguous() if zeros is not None else None
    out = _launch(x2, qweight.contiguous(), scales.contiguous(), zeros, bias, group_size, bits, N)
    return out.view(*x.shape[:-1], N)


def w4a16_linear_triton(x, qweight, scales, zeros, group_size, bias=None):
    return _linear_triton(x, qweight, scales, zeros, group_size, bias, 4)


def w8a16_linear_triton(x, qweight, scales, group_size, bias=None):
    return _linear_triton(x, qweight, scales, None, group_size, bias, 8)


def prepare_w4(qweight, scales, zeros, group_size):
    """Called once per layer at load time. The engine layout is already the kernel's layout (int32 rows
    contiguous along N, coalesced for both regimes), so this only makes the tensors contiguous."""
    return qweight.contiguous(), scales.contiguous(), zeros.contiguous()


def w4a16_linear(x, qweight, scales, zeros, group_size, bias=None):
    """x [..., K] @ W4 [K, N] -> [..., N] in x's dtype."""
    fn = w4a16_linear_triton if use_triton(x) else w4a16_linear_ref
    return fn(x, qweight, scales, zeros, group_size, bias)


def w8a16_linear(x, qweight, scales, group_size, bias=None):
    """x [..., K] @ W8 [K, N] -> [..., N] in x's dtype."""
    fn = w8a16_linear_triton if use_triton(x) else w8a16_linear_ref
    return fn(x, qweight, scales, group_size, bias)
