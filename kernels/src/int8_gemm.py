"""Triton kernels of W8A8 (SmoothQuant): per-token int8 activation quantization and the int8 GEMM.

Quantization of row m of x: a_scale[m] = max|x[m]| / 127, q = floor(x / a_scale + 1/2) in -127..127
(floor(v + 1/2) rather than round-half-even: both torch and Triton have it, so the reference can match
bit for bit). The GEMM multiplies int8 tiles into an int32 accumulator with tl.dot (exact), and its
epilogue applies y = float(acc) * a_scale[m] * w_scale[n] (+ bias) in fp32 before the store in the output
dtype. Launch, tuning and the torch references live in int8_linear.py.
"""

from ._triton import tl, triton

QMAX = 127.0
MIN_SCALE = 1e-10  # an all-zero row quantizes to zeros instead of dividing by zero


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, BLOCK_K: tl.constexpr, QMAX: tl.constexpr,
                         MIN_SCALE: tl.constexpr):
    """One program per row: two passes over K in BLOCK_K chunks (absmax, then round and store).
    QMAX / MIN_SCALE arrive as constexpr arguments: compiled Triton reads no plain module globals."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / QMAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.floor(x / scale + 0.5), -QMAX), QMAX)
        tl.store(q_ptr + row.to(tl.int64) * K + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def int8_gemm_kernel(a_ptr, b_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_am, stride_bk, stride_bn,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out [M, N] = (a [M, K] int8 @ b [K, N] int8) * a_scale[:, None] * w_scale[None, :] (+ bias).

    b is addressed by strides, so it may be the engine's [K, N] or a [N, K] (k-contiguous) copy, which is
    what Hopper's int8 wgmma wants. Tiles are visited in groups of GROUP_M rows of tiles so that
    neighbouring programs share B tiles in L2.
    """
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # clamp rows/columns instead of masking the loads: edge tiles compute garbage that is never stored
    rm = tl.minimum(offs_m, M - 1).to(tl.int64)
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    mask_m, mask_n = offs_m < M, offs_n < N
    a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
