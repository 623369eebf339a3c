"""Triton MoE experts: `moe.moe_experts` over (token, slot) pairs, with no host sync (CUDA-graph capturable).

Row p = t * k + j of the intermediate tensors is token t's slot j, served by expert ids[t, j]. Each of the two
linears (gate_up on x, down on the activations) is one launch of one of two kernels:

- grouped (prefill, n = T * k > GEMV_MAX_PAIRS): `align_pairs` sorts the pairs by expert with torch ops of
  static shapes and pads every expert's run to a multiple of BLOCK_M with the sentinel n, so each BLOCK_M block
  of the sorted list belongs to one expert (`block_expert`; -1 past the last used block). A program computes a
  BLOCK_M x BLOCK_N tile C[pairs] = A[rows(pairs)] @ W_e^T with tl.dot over K, gathering A's rows through the
  pair list and scattering C to the pairs' own rows; sentinel rows are masked off.
- gemv (decode, few pairs): one program per (pair, BLOCK_N columns) reads its own expert's columns only, so a
  decode step streams just the selected experts' weights.

Both take the engine's three weight formats (moe.py): fp [E, N, K], W4 (int32 [E, K/8, N], 8 consecutive k a
word, scales / zeros [E, K/G, N]) and W8 (int8 [E, K, N], scales [E, K/G, N]), dequantized a [BLOCK_K,
BLOCK_N] tile at a time inside one quant group (BLOCK_K divides G), rounded as the reference rounds: to the
scales' dtype, then to the activations'. Sums in fp32, outputs rounded to x's dtype; silu_mul between the
linears and the weighted combine after them are the shared ones.
"""

from __future__ import annotations

import torch

from ._triton import INTERPRET, dot_acc, tl, triton
from .activation import silu_mul
from .moe import Experts, combine

GEMV_MAX_PAIRS = 32  # n = T * k at most this: gemv (weights read per pair), else grouped (per expert block)
# grouped: BLOCK_M 64 once experts average a full block of pairs, else 16 (less padding at small batches)
GROUPED_BLOCK_M, GROUPED_BLOCK_M_SMALL = 64, 16
GROUPED_BLOCK_N, GROUPED_BLOCK_K = 128, 64
GROUPED_WARPS, GROUPED_STAGES = 4, 3
GEMV_BLOCK_N, GEMV_BLOCK_K = 32, 128
GEMV_WARPS = 4


# ---- routing: pairs sorted by expert, in blocks of one expert ------------------------------------------

def grouped_block_m(n_pairs: int, num_experts: int) -> int:
    return GROUPED_BLOCK_M if n_pairs >= GROUPED_BLOCK_M * num_experts else GROUPED_BLOCK_M_SMALL


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs int32 [L], block_expert int32 [L / block_m]).

    sorted_pairs lists the pairs p = t * k + j expert by expert (ascending p within one), each expert's run
    padded up to a multiple of block_m with the sentinel n = T * k; block_expert[b] is the expert of block b,
    -1 for blocks past the last run. L = block_m * floor((n + E * (block_m - 1)) / block_m), the most the
    padded runs can take, so every shape depends on (T, k, E, block_m) alone: no .item(), no sync."""
    flat = ids.reshape(-1).to(torch.int64)
    n, device = flat.numel(), flat.device
    # scatter_add rather than bincount: bincount on CUDA reads the largest id back to size its output
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    padded_end = torch.cumsum(padded, 0)
    experts, order = torch.sort(flat, stable=True)  # stable: pairs stay in token order within an expert
    dest = (padded_end - padded)[experts] + torch.arange(n, device=device) - start[experts]
    n_blocks = (n + num_experts * (block_m - 1)) // block_m
    sorted_pairs = torch.full((n_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    # block b starts at b * block_m: its expert is the first whose padded run ends after that
    block_start = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


# ---- kernels -------------------------------------------------------------------------------------------

@triton.jit
def _round(v, DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 v -> DTYPE, to nearest even. BY_HAND (the interpreter, which truncates fp32 -> bf16): bf16 rounded
    on the bits first, so the interpreted kernels round as the GPU (and the torch reference) do."""
    if BY_HAND and DTYPE == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # ties to the even upper half
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, e, k0, offs_n, n_mask, N, K, G, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """Expert e's W^T[k0 : k0 + BLOCK_K, offs_n] as a [BLOCK_K, BLOCK_N] tile in DTYPE (e int64)."""
    if BITS == 16:  # [E, N, K]: k contiguous
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + e * N * K + offs_n[None, :] * K + offs_k[:, None],
                    mask=(offs_k < K)[:, None] & n_mask[None, :], other=0.0).to(DTYPE)
    else:
        # the tile lies inside one quant group (BLOCK_K divides G): one row of scales (and zeros)
        g_off = e * (K // G) * N + (k0 // G) * N + offs_n
        s = tl.load(s_ptr + g_off, mask=n_mask, other=0.0)
        if BITS == 4:
            offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(w_ptr + e * (K // 8) * N + offs_w[:, None] * N + offs_n[None, :],
                            mask=n_mask[None, :], other=0)
            # word r holds k = 8r .. 8r+7, k = 8r + j in bits 4j .. 4j+3; row-major reshape keeps k in order
            codes = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
            codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
            z = tl.load(z_ptr + g_off, mask=n_mask, other=0.0)
            val = (codes.to(tl.float32) - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_ptr + e * K * N + offs_k[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            val = q.to(tl.float32) * s.to(tl.float32)[None, :]
        w = _round(val, s.dtype, BY_HAND).to(DTYPE)  # as moe.expert_weight: dequantized in the scales' dtype
    return w


@triton.jit
def _grouped_kernel(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, sorted_ptr, block_expert_ptr, n_pairs, N, K, G,
                    TOP_K: tl.constexpr, A_TOKENS: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr, UPCAST: tl.constexpr):
    """out[pairs] = A[rows(pairs)] @ W_e^T for one block of BLOCK_M sorted pairs (one expert e) and BLOCK_N
    columns. A_TOKENS: A is x and a pair's row is its token (gate_up), else the pair's own row (down)."""
    pid_m = tl.program_id(0)  # fastest: the blocks sharing a column block run together, reusing W_e in L2
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # past the padded runs: the grid is sized for the worst case
        return
    e = e.to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < n_pairs  # the sentinel n pads each expert's run
    if A_TOKENS:
        rows = (pairs // TOP_K).to(tl.int64)
    else:
        rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + offs_k[None, :], mask=valid[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, e, k0, offs_n, n_mask, N, K, G, BITS, BLOCK_K, BLOCK_N,
                         a_ptr.dtype.element_ty, UPCAST)
        if EXACT:  # fp32 activations: fp32 products, not TF32
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = dot_acc(a, w, acc, UPCAST)
    out = out_ptr + pairs.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, _round(acc, out_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _gemv_kernel(a_ptr, ids_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, TOP_K: tl.constexpr,
                 A_TOKENS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr):
    """out[pair, cols] = A[row(pair)] . W_e[cols, :] for one pair and BLOCK_N columns, e = ids[pair]."""
    pair = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    if A_TOKENS:
        row = pair // TOP_K
    else:
        row = pair
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced over k once, after the loop
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + row * K + offs_k, mask=offs_k < K, other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, e, k0, offs_n, n_mask, N, K, G, BITS, BLOCK_K, BLOCK_N,
                         a_ptr.dtype.element_ty, UPCAST)
        acc += a.to(tl.float32)[:, None] * w.to(tl.float32)
    y = tl.sum(acc, axis=0)
    tl.store(out_ptr + pair * N + offs_n, _round(y, out_ptr.dtype.element_ty, UPCAST), mask=n_mask)


# ---- launch --------------------------------------------------------------------------------------------

def _in_features(w: Experts) -> int:
    if w.bits == 16:
        return w.weight.shape[2]
    return w.qweight.shape[1] * (8 if w.bits == 4 else 1)


def _weight_args(w: Experts):
    """(weight or qweight, scales, zeros) pointers; the unused ones point at the weight (never read)."""
    main = (w.weight if w.bits == 16 else w.qweight).contiguous()
    s = w.scales.contiguous() if w.scales is not None else main
    z = w.zeros.contiguous() if w.zeros is not None else s
    return main, s, z


def _block_k(w: Experts, K: int, default: int) -> int:
    """default for fp weights (the K tail masked); quantized: the largest power of two <= default dividing G,
    so a tile never straddles two groups."""
    if w.bits == 16:
        return min(default, max(16, triton.next_power_of_2(K)))
    bk = default
    while bk > 16 and w.group_size % bk:
        bk //= 2
    if w.group_size % bk or K % w.group_size:
        raise ValueError(f"quant group {w.group_size} (K {K}) needs a power-of-two divisor >= 16")
    return bk


def _check(w: Experts):
    if w.bits not in (4, 8, 16):
        raise ValueError(f"unsupported expert bits {w.bits}")


def _grouped_linear(a: torch.Tensor, w: Experts, sorted_pairs, block_expert, n_pairs: int, top_k: int,
                    a_tokens: bool, block_m: int) -> torch.Tensor:
    K, N = _in_features(w), w.out_features
    out = torch.empty(n_pairs, N, dtype=a.dtype, device=a.device)
    bk = _block_k(w, K, GROUPED_BLOCK_K)
    grid = (block_expert.numel(), triton.cdiv(N, GROUPED_BLOCK_N))
    _grouped_kernel[grid](a, *_weight_args(w), out, sorted_pairs, block_expert, n_pairs, N, K, w.group_size,
                          TOP_K=top_k, A_TOKENS=a_tokens, BITS=w.bits, BLOCK_M=block_m, BLOCK_N=GROUPED_BLOCK_N,
                          BLOCK_K=bk, EXACT=a.dtype == torch.float32, UPCAST=INTERPRET,
                          num_warps=GROUPED_WARPS, num_stages=GROUPED_STAGES)
    return out


def _gemv_linear(a: torch.Tensor, w: Experts, flat_ids, n_pairs: int, top_k: int, a_tokens: bool) -> torch.Tensor:
    K, N = _in_features(w), w.out_features
    out = torch.empty(n_pairs, N, dtype=a.dtype, device=a.device)
    bk = _block_k(w, K, GEMV_BLOCK_K)
    grid = (n_pairs, triton.cdiv(N, GEMV_BLOCK_N))
    _gemv_kernel[grid](a, flat_ids, *_weight_args(w), out, N, K, w.group_size, TOP_K=top_k, A_TOKENS=a_tokens,
                       BITS=w.bits, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=bk, UPCAST=INTERPRET, num_warps=GEMV_WARPS)
    return out


def select_path(n_pairs: int) -> str:
    return "gemv" if n_pairs <= GEMV_MAX_PAIRS else "grouped"


def moe_experts_triton(x: torch.Tensor, gate_up: Experts, down: Experts, weights: torch.Tensor, ids: torch.Tensor,
                       path: str | None = None) -> torch.Tensor:
    """x [T, H]; routing weights [T, k] fp32, expert ids [T, k] -> [T, H] in x's dtype. path: "gemv" or
    "grouped" (default by the pair count, select_path)."""
    _check(gate_up)
    _check(down)
    T, H = x.shape
    k = ids.shape[1]
    n = T * k
    if n == 0:
        return x.new_empty(T, H)
    path = path or select_path(n)
    x = x.contiguous()
    if path == "gemv":
        flat = ids.reshape(-1).contiguous()
        h = _gemv_linear(x, gate_up, flat, n, k, a_tokens=True)
        pair_out = _gemv_linear(silu_mul(h), down, flat, n, k, a_tokens=False)
    elif path == "grouped":
        bm = grouped_block_m(n, gate_up.num_experts)
        sorted_pairs, block_expert = align_pairs(ids, gate_up.num_experts, bm)  # one sort serves both linears
        h = _grouped_linear(x, gate_up, sorted_pairs, block_expert, n, k, True, bm)
        pair_out = _grouped_linear(silu_mul(h), down, sorted_pairs, block_expert, n, k, False, bm)
    else:
        raise ValueError(f"unknown MoE path {path!r}")
    return combine(pair_out, weights, x.dtype)
