"""Triton MoE experts: `moe.moe_experts` over (token, slot) pairs, with no host sync (CUDA-graph capturable).

Row p = t * k + j of the intermediate tensors is token t's slot j, served by expert ids[t, j]. Each of the two
linears (gate_up on x, down on the activations) is one launch of one of two kernels:

- grouped (prefill, n = T * k > GEMV_MAX_PAIRS): `align_pairs` sorts the pairs by expert with torch ops of
  static shapes and pads every expert's run to a multiple of BLOCK_M with the sentinel n, so each BLOCK_M block
  of the sorted list belongs to one expert (`block_expert`; -1 past the last used block). A program computes a
  BLOCK_M x BLOCK_N tile C[pairs] = A[rows(pairs)] @ W_e^T with tl.dot over K, gathering A's rows through the
  pair list and scattering C to the pairs' own rows; sentinel rows are masked off.
- gemv (decode, few pairs): one program per (pair, BLOCK_N columns) reads its own expert's columns only, so a
  decode step streams just the selected experts' weights. The gate_up program takes matching gate and up
  columns and writes silu(gate) * up itself; no silu_mul launch.

Both take the engine's three weight formats (moe.py): fp [E, N, K], W4 (int32 [E, K/8, N], 8 consecutive k a
word, scales / zeros [E, K/G, N]) and W8 (int8 [E, K, N], scales [E, K/G, N]), dequantized a tile at a time
inside one quant group (BLOCK_K divides G). Sums in fp32; h, the activations and each pair's output rounded
where the reference rounds them; the grouped path rounds the dequantized weights too, the gemv keeps them exact
in fp32 as the dense W4 / W8 GEMVs do (DECODE_ROUND_WEIGHTS: rounded, bit-equal to the reference). The
combine is the down launch's epilogue on both paths: each pair's output, rounded, times its routing weight,
atomically added into its token's fp32 row, rounded by whoever reads the sums (a PendingSum's reader, or
moe_experts_triton).
Routing (softmax, top-k, renormalize) is one launch too: _route_topk_kernel (the router's GEMV stays cuBLAS's:
a kernel doing both measured 8.1 vs 7.2 us a token on an H100, session 17).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton import INTERPRET, dot_acc, pdl_args, pdl_wait, tl, triton
from .activation import silu_mul
from .moe import Experts
from .pending import PendingSum
from .quant_gemv import _code, _lop3, _rotations
from .quant_linear import _workspace

GEMV_MAX_PAIRS = 32  # n = T * k at most this: gemv (weights read per pair), else grouped (per expert block)


class GroupedConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


class DecodeConfig(NamedTuple):
    block_n: int  # output columns a program (gate_up: gate and up columns each)
    block_k: int  # k a step (quantized: at most a quant group)
    warps: int
    stages: int  # Triton's software pipeline over the k steps (cp.async): loads in flight
    split: int = 1  # programs along K (at most one per k step): more programs, each a shorter walk


# (min pairs an expert on average, config), first match wins; BLOCK_M small while experts get few pairs
# (less padding), larger once they fill blocks
# Tuned on an H100 for Qwen3-30B-A3B's experts (benchmarks/moe_kernels.py's sweep, bf16): 4096 tokens 128x256
# (0.95 ms vs 1.13 for 64x128), 1024 tokens 64x128, 64-256 tokens 16x64 with BLOCK_K 128.
GROUPED_CONFIGS = [(256, GroupedConfig(128, 256, 64, 8, 3)), (64, GroupedConfig(64, 128, 64, 4, 3)),
                   (0, GroupedConfig(16, 64, 128, 4, 4))]
SMEM_BUDGET = 200 * 1024  # Hopper has 228 KB a block; a config whose pipelined tiles need more is skipped
# gemv: dequantized weights exact in fp32, as the dense W4 / W8 GEMVs (True: rounded to the scales' dtype as the
# reference rounds them; more instructions a weight: H100, 30B-A3B experts, W4 g128 gate_up + down 25.0 us rounded
# vs 20.2 exact, W8 33.5 vs 32.8)
DECODE_ROUND_WEIGHTS = False
# (bits, swiglu) -> config; the H100 sweep's best at Qwen3-30B-A3B's shapes with exact weights (session 16: bf16
# 97% of copy; W4 g128 split in two along K: gate_up 13.5 vs 14.8 us, down 6.4 vs 7.1; W8 unchanged)
DECODE_CONFIGS = {(16, True): DecodeConfig(32, 128, 2, 3), (16, False): DecodeConfig(32, 128, 2, 3),
                  (4, True): DecodeConfig(32, 128, 4, 3, 2), (4, False): DecodeConfig(64, 128, 4, 3, 2),
                  (8, True): DecodeConfig(32, 128, 2, 3), (8, False): DecodeConfig(32, 128, 2, 3)}


# ---- routing: pairs sorted by expert, in blocks of one expert ------------------------------------------

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


# ---- routing kernel: softmax, top-k, renormalize in one launch -------------------------------------------

@triton.jit
def _topk_store(logits, offs, live, t, w_ptr, ids_ptr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                RENORMALIZE: tl.constexpr):
    """Token t's routing from its fp32 logits [BLOCK_E] (-inf where not live): softmax, the TOP_K largest
    probabilities (ties: the lower expert, as the first of equal maxima), renormalized to sum 1 or not, stored
    in descending order."""
    p = tl.exp(logits - tl.max(logits, axis=0))
    probs = p / tl.sum(p, axis=0)
    left = tl.where(live, probs, -1.0)  # probabilities not taken yet
    rank = tl.full((BLOCK_E,), -1, tl.int32)  # each taken expert's slot
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, offs, BLOCK_E), axis=0)
        rank = tl.where(offs == pick, j, rank)
        left = tl.where(offs == pick, -1.0, left)
    taken = rank >= 0
    w = tl.where(taken, probs, 0.0)
    if RENORMALIZE:
        w = w / tl.sum(w, axis=0)
    tl.store(w_ptr + t * TOP_K + rank, w, mask=taken)
    tl.store(ids_ptr + t * TOP_K + rank, offs.to(tl.int64), mask=taken)


@triton.jit
def _route_topk_kernel(logits_ptr, w_ptr, ids_ptr, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                       RENORMALIZE: tl.constexpr):
    """One token's routing from its E logits (_topk_store)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    live = offs < E
    logits = tl.load(logits_ptr + t * E + offs, mask=live, other=float("-inf")).to(tl.float32)
    _topk_store(logits, offs, live, t, w_ptr, ids_ptr, TOP_K, BLOCK_E, RENORMALIZE)


def route_topk_triton(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.route_topk in one launch (torch's softmax + topk + renormalize take 5-6)."""
    T, E = logits.shape
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T:
        _route_topk_kernel[(T,)](logits.contiguous(), weights, ids, E, TOP_K=k, BLOCK_E=triton.next_power_of_2(E),
                                 RENORMALIZE=renormalize, num_warps=1 if E <= 128 else 4)
    return weights, ids


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
def _moe_grouped_kernel(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, route_w_ptr, sorted_ptr, block_expert_ptr, n_pairs, N, K,
                    G, TOP_K: tl.constexpr, A_TOKENS: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr, UPCAST: tl.constexpr):
    """out[pairs] = A[rows(pairs)] @ W_e^T for one block of BLOCK_M sorted pairs (one expert e) and BLOCK_N
    columns. A_TOKENS (gate_up): A is x and a pair's row is its token; else (down) the pair's own row, and the
    outputs, rounded to the model dtype and times their routing weights, are added into their tokens' fp32
    rows of out [T, N] (the combine, without a [T*k, N] round trip)."""
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
    mask = valid[:, None] & n_mask[None, :]
    if A_TOKENS:
        tl.store(out_ptr + pairs.to(tl.int64)[:, None] * N + offs_n[None, :], _round(acc, a_ptr.dtype.element_ty,
                 UPCAST), mask=mask)
    else:
        y = _round(acc, a_ptr.dtype.element_ty, UPCAST).to(tl.float32)
        y *= tl.load(route_w_ptr + pairs, mask=valid, other=0.0)[:, None]
        tl.atomic_add(out_ptr + (pairs // TOP_K).to(tl.int64)[:, None] * N + offs_n[None, :], y, mask=mask,
                      sem="relaxed")


@triton.jit
def _nibble(words, J: tl.constexpr, ASM: tl.constexpr):
    """Code J (bits 4J .. 4J+3) of every int32 word as fp32 128 + code: shifted to bit 16, then one LOP3 puts
    it under the exponent of 128.0 (no int -> float convert)."""
    A: tl.constexpr = 16 - 4 * J
    if A > 0:
        v = words << A
    elif A < 0:
        v = words >> (-A)  # arithmetic: the sign bits land outside the mask
    else:
        v = words
    return _lop3(v, 0xF0000, 0x43000000, ASM)


@triton.jit
def _gemv_step(acc, a_row, w_ptr, s_ptr, z_ptr, e, k0, cols, n_mask, N, K, G, BITS: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_W: tl.constexpr, ASM: tl.constexpr,
                 BY_HAND: tl.constexpr):
    """acc [ROWS, BN] += the products of k0 .. k0 + BLOCK_K for expert e's weight rows `cols` (fp32).
    BLOCK_K divides G: the step has one row of scales (and zeros). ROUND_W: dequantized weights rounded to
    the scales' dtype, as the reference; else exact in fp32 (as the dense W4 / W8 GEMVs), fewer instructions."""
    if BITS == 16:  # [E, N, K]: k contiguous; the K tail masked
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_ptr + e * N * K + cols[None, :] * K + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        x = tl.load(a_row + offs_k, mask=k_mask, other=0.0)
        acc += x.to(tl.float32)[:, None] * w.to(tl.float32)
    else:
        g_off = e * (K // G) * N + (k0 // G) * N + cols
        s = tl.load(s_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if BITS == 8:  # [E, K, N] int8
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_ptr + e * K * N + offs_k[:, None] * N + cols[None, :], mask=n_mask[None, :], other=0)
            x = tl.load(a_row + offs_k).to(tl.float32)
            if ROUND_W:
                acc += _round(q.to(tl.float32) * s, s_ptr.dtype.element_ty, BY_HAND).to(tl.float32) * x[:, None]
            else:
                acc += q.to(tl.float32) * (x[:, None] * s)
        else:  # [E, K/8, N] int32, k = 8 r + j in bits 4j of word r
            rows = k0 // 8 + tl.arange(0, ROWS)
            words = tl.load(w_ptr + e * (K // 8) * N + rows[:, None] * N + cols[None, :], mask=n_mask[None, :],
                            other=0)
            z = tl.load(z_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if ROUND_W:  # each weight (q - z) * s rounded to the scales' dtype, as the reference
                for j in tl.static_range(8):
                    w = _round((_nibble(words, j, ASM) - (128.0 + z)) * s, s_ptr.dtype.element_ty, BY_HAND)
                    acc += w.to(tl.float32) * tl.load(a_row + rows * 8 + j).to(tl.float32)[:, None]
            else:  # part = sum_j (MAGIC_j + q_j) x_j: a LOP3 and an FMA a weight from the word's rotations (the
                # dense W4 GEMV's decode, quant_gemv._code); the MAGIC_j + z offsets removed once a word row
                rotated = _rotations(words.to(tl.uint32, bitcast=True))
                part = tl.zeros(acc.shape, dtype=tl.float32)
                xsum = tl.zeros((ROWS,), dtype=tl.float32)
                xmagic = tl.zeros((ROWS,), dtype=tl.float32)
                for j in tl.static_range(8):
                    xj = tl.load(a_row + rows * 8 + j).to(tl.float32)
                    part += _code(rotated, j, 4, ASM) * xj[:, None]
                    xsum += xj
                    xmagic += xj * (2048.0 if j % 2 == 1 else 128.0)
                acc += s * (part - z * xsum[:, None] - xmagic[:, None])
    return acc


@triton.jit
def _moe_gemv_kernel(a_ptr, ids_ptr, route_w_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, N, K, G,
                   K_PER_SPLIT, TOP_K: tl.constexpr, BITS: tl.constexpr, SWIGLU: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, ROUND_W: tl.constexpr,
                   SPLIT_K: tl.constexpr, ASM: tl.constexpr, BY_HAND: tl.constexpr, PDL: tl.constexpr):
    """One pair, BLOCK_N output columns, e = ids[pair], K_PER_SPLIT of K (program_id 2): the decode path's two
    launches.
    SWIGLU (gate_up, A = x by token): the program takes gate rows cols and up rows I + cols of W_e (N = 2I),
    rounds both as the reference rounds h and writes silu(gate) * up to out [pairs, I]. SPLIT_K: the slices'
    partial sums meet in the fp32 workspace by atomic add; the tile's last program (a counter) reads and zeroes
    them, resets the counter and writes the activations (the launch leaves both clean: graph safe).
    else (down, A = the pair's activation row): y = A . W_e[cols]^T rounded to the model dtype (the pair's
    output; split K: each slice's part unrounded), times the pair's routing weight, atomically added to its
    token's fp32 row of out [T, N]."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    N_OUT = N // 2 if SWIGLU else N
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N_OUT
    a_row = a_ptr + (pair // TOP_K if SWIGLU else pair) * K
    k_begin = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # reduced over its rows once, after the loop
    acc_up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):  # stages: loads in flight (cp.async)
        acc = _gemv_step(acc, a_row, w_ptr, s_ptr, z_ptr, e, k0, cols, n_mask, N, K, G, BITS, ROWS, BLOCK_K,
                           ROUND_W, ASM, BY_HAND)
        if SWIGLU:
            acc_up = _gemv_step(acc_up, a_row, w_ptr, s_ptr, z_ptr, e, k0, cols + N_OUT, n_mask, N, K, G, BITS,
                                  ROWS, BLOCK_K, ROUND_W, ASM, BY_HAND)
    dtype = a_ptr.dtype.element_ty
    gate = tl.sum(acc, axis=0)
    if SWIGLU:
        up = tl.sum(acc_up, axis=0)
        write = True
        if SPLIT_K:
            offs = pair * N + cols  # workspace row [gate | up] of the pair
            tl.atomic_add(ws_ptr + offs, gate, mask=n_mask, sem="relaxed")
            tl.atomic_add(ws_ptr + offs + N_OUT, up, mask=n_mask, sem="relaxed")
            tl.debug_barrier()  # every thread's adds precede the counter's release
            tile = pair * tl.num_programs(1) + tl.program_id(1)
            write = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == tl.num_programs(2) - 1
            if write:  # int32 views: the interpreter has no fp32 atomic_xchg
                zero = tl.zeros((BLOCK_N,), dtype=tl.int32)
                gate = tl.atomic_xchg(ws_bits_ptr + offs, zero, mask=n_mask).to(tl.float32, bitcast=True)
                up = tl.atomic_xchg(ws_bits_ptr + offs + N_OUT, zero, mask=n_mask).to(tl.float32, bitcast=True)
                tl.atomic_xchg(cnt_ptr + tile, 0)
        if write:  # as silu_mul_ref on h rounded to the model dtype: silu rounded, then the product
            y = _round(gate, dtype, BY_HAND).to(tl.float32)
            up = _round(up, dtype, BY_HAND).to(tl.float32)
            act = _round(y / (1.0 + tl.exp(-y)), dtype, BY_HAND).to(tl.float32)
            tl.store(out_ptr + pair * N_OUT + cols, _round(act * up, dtype, BY_HAND), mask=n_mask)
    else:
        y = gate if SPLIT_K else _round(gate, dtype, BY_HAND).to(tl.float32)
        w = tl.load(route_w_ptr + pair)
        tl.atomic_add(out_ptr + (pair // TOP_K) * N + cols, y * w, mask=n_mask, sem="relaxed")


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


def grouped_config(n_pairs: int, num_experts: int, element_size: int = 2) -> GroupedConfig:
    """The first config whose min_pairs (pairs an expert on average) the batch reaches and whose tiles, in
    activations of element_size bytes, fit shared memory (fp32 halves what a bf16 tile may be)."""
    per_expert = n_pairs / num_experts

    def fits(c: GroupedConfig) -> bool:
        return (c.block_m * c.block_k + c.block_k * c.block_n) * element_size * c.stages <= SMEM_BUDGET

    return next(cfg for min_pairs, cfg in GROUPED_CONFIGS if per_expert >= min_pairs and fits(cfg))


def _grouped_linear(a: torch.Tensor, w: Experts, sorted_pairs, block_expert, n_pairs: int, top_k: int,
                    cfg: GroupedConfig, route_w: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """gate_up (route_w None): h [n_pairs, N] in a's dtype; down: the weighted outputs added into out [T, N]."""
    K, N = _in_features(w), w.out_features
    if route_w is None:
        out = torch.empty(n_pairs, N, dtype=a.dtype, device=a.device)
    grid = (block_expert.numel(), triton.cdiv(N, cfg.block_n))
    _moe_grouped_kernel[grid](a, *_weight_args(w), out, route_w if route_w is not None else out, sorted_pairs,
                          block_expert, n_pairs, N, K, w.group_size, TOP_K=top_k, A_TOKENS=route_w is None,
                          BITS=w.bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=_block_k(w, K, cfg.block_k),
                          EXACT=a.dtype == torch.float32, UPCAST=INTERPRET, num_warps=cfg.warps,
                          num_stages=cfg.stages)
    return out


def decode_config(w: Experts, swiglu: bool) -> DecodeConfig:
    return DECODE_CONFIGS[(w.bits, swiglu)]


def _decode_linear(a: torch.Tensor, w: Experts, flat_ids, n_pairs: int, top_k: int, route_w=None, out=None,
                   cfg: DecodeConfig | None = None):
    """gate_up (route_w None): silu(gate) * up [n_pairs, N/2] in a's dtype; down: the weighted outputs added
    into out [T, N] (fp32)."""
    K, N = _in_features(w), w.out_features
    swiglu = route_w is None
    cfg = cfg or decode_config(w, swiglu)
    bk = _block_k(w, K, cfg.block_k)
    if swiglu:
        out = torch.empty(n_pairs, N // 2, dtype=a.dtype, device=a.device)
    steps = triton.cdiv(K, bk)
    per = triton.cdiv(steps, max(1, min(cfg.split, steps)))  # k steps a program
    grid = (n_pairs, triton.cdiv(N // 2 if swiglu else N, cfg.block_n), triton.cdiv(steps, per))
    split = grid[2] > 1
    part = part_bits = cnt = out  # placeholders: read only by gate_up split along K
    if split and swiglu:  # its slices meet in the shared split-K workspace, past the [T, H] a deferred combine holds
        ws, cnt = _workspace(a.device, a.numel() + n_pairs * N, grid[0] * grid[1])
        part = ws[a.numel():]
        part_bits = part.view(torch.int32)
    _moe_gemv_kernel[grid](a, flat_ids, route_w if route_w is not None else a, *_weight_args(w), out, part,
                         part_bits, cnt, N, K, w.group_size, per * bk, TOP_K=top_k, BITS=w.bits,
                         SWIGLU=swiglu, ROWS=bk // 8 if w.bits == 4 else bk, BLOCK_N=cfg.block_n, BLOCK_K=bk,
                         STAGES=cfg.stages, ROUND_W=DECODE_ROUND_WEIGHTS, SPLIT_K=split, ASM=not INTERPRET,
                         BY_HAND=INTERPRET, num_warps=cfg.warps, **pdl_args(a.device))
    return out


def select_path(n_pairs: int) -> str:
    return "gemv" if n_pairs <= GEMV_MAX_PAIRS else "grouped"


def _sums(T: int, H: int, device, defer: bool) -> torch.Tensor:
    """A zeroed fp32 [T, H] for the combine's atomic adds: deferred, the split-K linears' shared workspace,
    which the next kernel reads and zeroes again (pending.py)."""
    if not defer:
        return torch.zeros(T, H, dtype=torch.float32, device=device)
    ws, _ = _workspace(device, T * H, 0)
    return ws[:T * H].view(T, H)


def moe_experts_triton(x: torch.Tensor, gate_up: Experts, down: Experts, weights: torch.Tensor, ids: torch.Tensor,
                       path: str | None = None, defer: bool = False):
    """x [T, H]; routing weights [T, k] fp32, expert ids [T, k] -> [T, H] in x's dtype. path: "gemv" or
    "grouped" (default by the pair count, select_path). defer: a PendingSum of the fp32 sums instead, for the
    next RMSNorm to round (and zero): no launch of its own for the combine."""
    _check(gate_up)
    _check(down)
    T, H = x.shape
    k = ids.shape[1]
    n = T * k
    if n == 0:
        return x.new_empty(T, H)
    path = path or select_path(n)
    x = x.contiguous()
    route_w = weights.reshape(-1).contiguous().float()
    sums = _sums(T, down.out_features, x.device, defer)
    if path == "gemv":
        flat = ids.reshape(-1).contiguous()
        act = _decode_linear(x, gate_up, flat, n, k)
        _decode_linear(act, down, flat, n, k, route_w, sums)
    elif path == "grouped":
        cfg = grouped_config(n, gate_up.num_experts, x.element_size())
        sorted_pairs, block_expert = align_pairs(ids, gate_up.num_experts, cfg.block_m)  # one sort, both linears
        h = _grouped_linear(x, gate_up, sorted_pairs, block_expert, n, k, cfg)
        _grouped_linear(silu_mul(h), down, sorted_pairs, block_expert, n, k, cfg, route_w, sums)
    else:
        raise ValueError(f"unknown MoE path {path!r}")
    return PendingSum(sums, x.dtype) if defer else sums.to(x.dtype)
