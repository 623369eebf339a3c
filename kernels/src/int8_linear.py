"""W8A8 linear (SmoothQuant engines): y = dequant(quant_per_token(x) @ W8) + bias, int8 on both sides.

Engine layout as W8 per output channel (quant/src/primitives.py): qweight int8 [K, N], scales [1, N]. On CUDA
`prepare_w8a8` keeps the shape but stores qweight k-contiguous (a [N, K] buffer seen through its
transpose), the operand order Hopper's int8 wgmma reads; the kernel takes either through strides.

The torch references are the CPU path and the tests' ground truth: exact integer products (fp32 matmuls
over K-slices short enough that every partial sum stays below 2^24, summed in int32), then the same fp32
epilogue as the kernel.
"""

import torch

from ._triton import next_pow2, triton, use_triton
from .autotune import Autotuner, cold_launcher
from .int8_gemm import MIN_SCALE, QMAX, int8_gemm_kernel, quantize_rows_kernel

_tuner = Autotuner()
EXACT_K = int(2**24 // (QMAX * QMAX))  # 1040: a K-slice of int8 products whose fp32 sum is exact


def prepare_w8a8(qweight, scales):
    """Once per layer at load. CUDA: qweight k-contiguous (same [K, N] shape); CPU: unchanged."""
    if use_triton(qweight):
        qweight = qweight.t().contiguous().t()
    return qweight, scales.contiguous()


# ---- references (the CPU path) ------------------------------------------------------------------------

def quantize_per_token_ref(x):
    """x [M, K] -> (q int8 [M, K], scale fp32 [M]) with x ≈ q * scale[:, None]."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / QMAX).clamp(min=MIN_SCALE)
    q = torch.floor(x / scale[:, None] + 0.5).clamp(-QMAX, QMAX)
    return q.to(torch.int8), scale


def int_matmul_ref(a, b):
    """Exact a [M, K] int8 @ b [K, N] int8 -> int32 (fast fp32 matmuls, no fp64 or integer GEMM needed)."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k in range(0, a.shape[1], EXACT_K):
        acc += (a[:, k:k + EXACT_K].float() @ b[k:k + EXACT_K].float()).to(torch.int32)
    return acc


def int8_gemm_ref(a, a_scale, b, w_scale, bias=None, out_dtype=torch.float32):
    acc = int_matmul_ref(a, b).float()  # int32 -> fp32 as in the kernel: the same rounding for large sums
    y = acc * a_scale[:, None] * w_scale.reshape(-1).float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w8a8_linear_ref(x, qweight, scales, bias=None):
    q, a_scale = quantize_per_token_ref(x.reshape(-1, x.shape[-1]))
    y = int8_gemm_ref(q, a_scale, qweight, scales, bias, x.dtype)
    return y.view(*x.shape[:-1], qweight.shape[1])


# ---- Triton launch ------------------------------------------------------------------------------------

def quantize_per_token_triton(x):
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block = min(4096, next_pow2(K))
        quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), BLOCK_K=block, QMAX=QMAX, MIN_SCALE=MIN_SCALE,
                                   num_warps=4 if block <= 1024 else 8)
    return q, scale


def m_bucket(M):
    return min(next_pow2(max(M, 16)), 256) if M <= 256 else "large"


def candidates(M, K):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps), the first one untimed (interpreter)."""
    if M <= 16:  # decode: one row of tiles; narrow N tiles and deep K give the grid enough programs
        cfgs = [(16, bn, bk, 1, st, 4) for bn in (32, 64, 128) for bk, st in ((128, 4), (256, 3))]
    elif M <= 64:
        cfgs = [(bm, bn, 128, 8, st, 4) for bm in (32, 64) for bn in (64, 128) for st in (3, 4)]
    else:  # prefill. H100, Qwen3-8B shapes at M = 2048 (session 6): 128x128x128 in 3 stages wins (GROUP_M 16 on
        # three shapes, 4 warps on K = 12288); 2 or 4 stages, 256-row and 64-deep tiles were 10-60% slower
        cfgs = [(128, 128, 128, 16, 3, 8), (128, 128, 128, 8, 3, 8), (128, 128, 128, 8, 3, 4), (128, 128, 128, 16, 3, 4),
                (128, 256, 128, 16, 3, 8), (128, 256, 128, 8, 3, 8), (128, 128, 64, 8, 4, 8), (64, 128, 128, 8, 4, 4),
                (128, 64, 128, 8, 4, 4)]
    k_max = max(16, next_pow2(K))  # small K (tests): shrink BLOCK_K rather than loop over padding
    return list(dict.fromkeys((bm, bn, min(bk, k_max), g, st, w) for bm, bn, bk, g, st, w in cfgs))


def plan(a, a_scale, b, w_scale, bias, out_dtype):
    """(tuning key, candidate configs, run(cfg) -> y [M, N]) for quantized a [M, K] and b [K, N]."""
    M, K = a.shape
    N = b.shape[1]
    w_scale = w_scale.reshape(-1)

    def run(cfg):
        bm, bn, bk, group_m, stages, warps = cfg
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        int8_gemm_kernel[grid](a, b, a_scale, w_scale, bias if bias is not None else w_scale, out, M, N, K,
                               a.stride(0), b.stride(0), b.stride(1), HAS_BIAS=bias is not None,
                               EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
                               num_stages=stages, num_warps=warps)
        return out

    key = (m_bucket(M), N, K, b.stride(0) == 1, out_dtype, str(a.device))
    return key, candidates(M, K), run


def int8_gemm_triton(a, a_scale, b, w_scale, bias=None, out_dtype=torch.float32):
    if a.shape[0] == 0:
        return torch.empty(0, b.shape[1], dtype=out_dtype, device=a.device)
    a = a.contiguous()
    key, cands, run = plan(a, a_scale, b, w_scale, bias, out_dtype)
    launch = cold_launcher((b, w_scale), lambda w: plan(a, a_scale, *w, bias, out_dtype)[2])
    return run(_tuner.pick(key, cands, launch))


def w8a8_linear_triton(x, qweight, scales, bias=None):
    x2 = x.reshape(-1, x.shape[-1])
    q, a_scale = quantize_per_token_triton(x2 if x2.stride(-1) == 1 else x2.contiguous())
    y = int8_gemm_triton(q, a_scale, qweight, scales, bias, x.dtype)
    return y.view(*x.shape[:-1], qweight.shape[1])


# ---- public -------------------------------------------------------------------------------------------

def quantize_per_token(x):
    """x [M, K] -> (q int8 [M, K], scale fp32 [M]): dynamic symmetric per-token int8."""
    return (quantize_per_token_triton if use_triton(x) else quantize_per_token_ref)(x)


def w8a8_linear(x, qweight, scales, bias=None):
    """x [..., K] -> [..., N] in x's dtype through int8 x int8 -> int32 (qweight: engine or prepared layout)."""
    return (w8a8_linear_triton if use_triton(x) else w8a8_linear_ref)(x, qweight, scales, bias)
