"""Weight-only quantized linears: W4A16 (AWQ layout) and W8A16, y = x @ dequant(W) + bias.

Engine layouts (quant/src/primitives.py): W4 qweight int32 [K/8, N] (8 consecutive k per int32), scales/zeros
[K/G, N]; W8 qweight int8 [K, N], scales [K/G, N]. On CUDA, `prepare_w4` / `prepare_w8` repack qweight
once at load into the k-interleaved int32 [K/(P*R), R, N] layout of quant_gemv.py (3-D, so a prepared
tensor is never mistaken for an engine one); the kernels repack an unprepared qweight on every call
(correct, slow). The torch references take either layout.

Designs (picked per shape bucket by the autotuner, cached):
- gemv (M = 1, blocks inside one quant group): FMAs on [BB, R, BN] word tiles, zero point and MAGIC
  removed once per column; fused (M <= 64): the same with a dequant per value, or tl.dot on 16..64-row
  tiles; swapped (W4, 2 <= M <= 16, whole groups a block): y^T = W^T x^T on tensor cores with exact
  (q - z) weights as the register operand. All split K with in-kernel atomic reduction into a persistent
  fp32 workspace (see _finish), so the grid fills the GPU.
- dequant (M > 16): dequantize W to the activation dtype in one pass, then cuBLAS.
"""

import functools

import torch

from . import cpu_linear
from ._triton import INTERPRET, next_pow2, num_sms, pdl_args, triton, use_triton
from .autotune import Autotuner, cold_launcher
from .pending import PendingSum
from .quant_gemv import dequant_kernel, fused_kernel, gemv_kernel, swapped_kernel

FUSED_MAX_M = 64  # above: dequant + cuBLAS only
_tuner = Autotuner()
_workspaces = {}  # device -> (fp32 partial sums, int32 tile counters), both all-zero between launches


def select_regime(M: int) -> str:
    return "decode" if M <= 16 else "mid" if M <= FUSED_MAX_M else "prefill"


# ---- layouts -------------------------------------------------------------------------------------------

def _rows(k_words: int, G: int) -> int:
    """R: rows of words per block; 16 lets every sub-tile feed tl.dot (k >= 16)."""
    R = 16
    while R > 1 and (k_words % R or G % R):
        R //= 2
    return R


def _interleave(codes, bits, G):
    """Unsigned codes int32 [K, N] -> prepared int32 [K/(P*R), R, N]."""
    P = 32 // bits
    K, N = codes.shape
    R = _rows(K // P, G)
    c = codes.reshape(K // (P * R), P, R, N)
    out = torch.zeros(K // (P * R), R, N, dtype=torch.int32, device=codes.device)
    for j in range(P):
        out |= c[:, j] << (bits * j)
    return out


def _codes(prepared, bits):
    """Prepared int32 [B, R, N] -> unsigned codes int32 [K, N] (inverse of _interleave)."""
    P = 32 // bits
    B, R, N = prepared.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=prepared.device).view(1, P, 1, 1)
    return ((prepared.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(B * P * R, N)


def _w4_codes(qweight):
    if qweight.dim() == 3:
        return _codes(qweight, 4)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    return ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, qweight.shape[1])


def _w8_codes(qweight):
    return _codes(qweight, 8) - 128 if qweight.dim() == 3 else qweight


def _pack_w4(qweight, G):
    return qweight if qweight.dim() == 3 else _interleave(_w4_codes(qweight), 4, G)


def _pack_w8(qweight, G):
    return qweight if qweight.dim() == 3 else _interleave(qweight.to(torch.int32) + 128, 8, G)


def prepare_w4(qweight, scales, zeros, group_size):
    """Once per layer at load. CUDA: repack for the kernels; CPU: ATen's int4 pack (cpu_linear.py) where its
    kernel takes the shape, else the engine tensors, unchanged."""
    if use_triton(qweight):
        qweight = _pack_w4(qweight.contiguous(), group_size)
    elif qweight.device.type == "cpu" and cpu_linear.w4_packable(qweight.shape[0] * 8, qweight.shape[1], group_size):
        return (*cpu_linear.pack_w4(_w4_codes(qweight), scales, zeros), None)
    return qweight.contiguous(), scales.contiguous(), zeros.contiguous()


def prepare_w8(qweight, scales, group_size):
    """Once per layer at load. CUDA: repack for the kernels; CPU: ATen's int8 layout (cpu_linear.py) for
    per-channel scales, else the engine tensors, unchanged."""
    if use_triton(qweight):
        qweight = _pack_w8(qweight.contiguous(), group_size)
    elif qweight.device.type == "cpu" and cpu_linear.w8_packable(*qweight.shape, group_size):
        return cpu_linear.pack_w8(qweight, scales)
    return qweight.contiguous(), scales.contiguous()


# ---- references (the CPU path) ------------------------------------------------------------------------

def _dequant_ref(q, scales, zeros, group_size):
    K, N = q.shape
    qg = q.view(K // group_size, group_size, N).float()
    z = zeros.float().unsqueeze(1) if zeros is not None else 0.0
    return ((qg - z) * scales.float().unsqueeze(1)).view(K, N).to(scales.dtype)


def _dequant_w4_ref(qweight, scales, zeros, group_size):
    return _dequant_ref(_w4_codes(qweight), scales, zeros, group_size)


def _dequant_w8_ref(qweight, scales, group_size):
    return _dequant_ref(_w8_codes(qweight), scales, None, group_size)


def _matmul_ref(x, w, bias):
    y = x @ w.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias=None):
    return _matmul_ref(x, _dequant_w4_ref(qweight, scales, zeros, group_size), bias)


def w8a16_linear_ref(x, qweight, scales, group_size, bias=None):
    return _matmul_ref(x, _dequant_w8_ref(qweight, scales, group_size), bias)


# ---- launch --------------------------------------------------------------------------------------------

def _workspace(device, numel, tiles):
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:  # grows during warm-up, never in a graph
        ws = torch.zeros(max(numel, 1 << 20), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _workspaces[device] = (ws, cnt)
    return ws, cnt


def block_m(M):
    return 1 if M == 1 else max(16, next_pow2(M))


# ("gemv", BLOCK_N, BB blocks a step, blocks a program, num_warps, stages): 8-32 words a thread a step;
# stages 0: prefetch by hand, else Triton's cp.async pipeline. H100 (session 9, `kernels.py --decode
# --gemv-sweep`, weights streamed from DRAM): more, shorter programs won every Qwen3-8B shape, W4 and W8 --
# 1 warp and 2-4 blocks a program (4096 -> 4096 W4: 2 warps, 2 blocks) -- 6-17% faster at M = 1 deferred
# than session 6's list (4-16 blocks, 2-4 warps); the cp.async pipeline and BB 2 no longer won any shape.
GEMV_CONFIGS = [("gemv", bn, 1, per, w, 0) for bn, w, pers in ((32, 1, (3, 4)), (64, 1, (2, 3, 4)), (64, 2, (2, 3, 4, 8)),
                                                             (128, 2, (4,)), (128, 4, (2, 3))) for per in pers] \
    + [("gemv", 64, 1, 8, 4, 0), ("gemv", 64, 1, 16, 2, 3)]


# ("swapped", BLOCK_N, programs per SM, num_warps, num_stages): H100 (session 8), timed as the runtime runs
# (deferred), the best of a 50-config sweep per Qwen3-8B shape: W4 M = 16 13-26% faster than fused's best
# (tl.dot with the dequantized tile as the shared-memory operand), at 2 warps (mma.sync); at 4 warps wgmma,
# waits on every dot and never won. Not offered: W8 (a swapped W8 with fused's dequant lost every shape by
# 2-5%) and M = 1 (the gemv won every shape by 25-40%).
SWAPPED_CONFIGS = [("swapped", 64, 8, 2, 2), ("swapped", 128, 4, 2, 3), ("swapped", 128, 8, 2, 3)]


def candidates(M, N, K, R, device, whole=False, bits=4):
    """GEMV_CONFIGS / ("fused", BLOCK_N, programs per SM, num_warps, num_stages, prefetch) / SWAPPED_CONFIGS /
    ("dequant", BLOCK_N). whole: no block spans two quant groups (G % (P*R) == 0), which gemv needs."""
    n_blocks = K // (32 // bits * R)
    if M == 1 and whole:  # fused stays a candidate: it won W8 before the gemv's masked prefetch (since: 0 of 8)
        return [c for c in GEMV_CONFIGS if c[2] <= c[3] <= n_blocks] + [("fused", 128, p, 4, 1, True) for p in (4, 8)]
    fused, dq = [], [("dequant", 256), ("dequant", 128)]
    if M == 1:
        fused = [("fused", bn, per_sm, 4, 1, True) for bn in (128, 256) for per_sm in (2, 4, 8)]
    elif M <= 16 and R >= 16:  # H200: Triton's pipeliner beat the hand prefetch, BN 64 beat 128
        fused = [("fused", bn, per_sm, 4, st, False) for bn, per_sm in ((32, 8), (32, 16), (64, 4), (64, 8))
                 for st in (2, 3)] + (SWAPPED_CONFIGS if bits == 4 and whole and R == 16 else [])
    elif M <= FUSED_MAX_M and R >= 16:
        fused = [("fused", bn, per_sm, 4, 2, True) for bn in (64, 128) for per_sm in (4, 8)]
    if M <= 16 and fused:
        return fused
    return fused + dq if M <= FUSED_MAX_M else dq[:1]


def _split(cfg, M, N, n_blocks, device):
    """Blocks per program, programs along K. gemv: as configured; fused: split K until per_sm programs
    per SM."""
    if cfg[0] == "gemv":
        per = min(n_blocks, cfg[3])
        return per, triton.cdiv(n_blocks, per)
    tiles = triton.cdiv(N, cfg[1]) * triton.cdiv(M, block_m(M))
    split = max(1, min(n_blocks, round(cfg[2] * num_sms(device) / tiles)))
    per = triton.cdiv(n_blocks, split)
    return per, triton.cdiv(n_blocks, per)


def plan(x2, qweight, scales, zeros, bias, G, bits):
    """(tuning key, candidate configs, run(cfg) -> y [M, N]) for a prepared qweight."""
    M, K = x2.shape
    n_blocks, R, N = qweight.shape
    args = dict(BITS=bits, R=R, SAFE=scales.dtype != torch.bfloat16, G_BIG=G % (R * 32 // bits) == 0,
                ASM=not INTERPRET)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales

    def run(cfg, defer=False):
        if cfg[0] == "dequant":
            w = torch.empty(K, N, device=x2.device, dtype=x2.dtype)
            dequant_kernel[(n_blocks, triton.cdiv(N, cfg[1]))](qweight, scales, z, w, N, G, **args, BLOCK_N=cfg[1])
            return x2 @ w if bias is None else torch.addmm(bias.to(x2.dtype), x2, w)
        per, split = _split(cfg, M, N, n_blocks, x2.device)
        bm = 1 if cfg[0] == "gemv" else block_m(M)
        grid = (triton.cdiv(N, cfg[1]), split, triton.cdiv(M, bm))
        ws, cnt = _workspace(x2.device, M * N, grid[0] * grid[2]) if split > 1 else (scales, scales)
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        common = (x2, qweight, scales, z, b, out, ws, ws.view(torch.int32) if split > 1 else ws, cnt)
        defer = defer and split > 1
        result = PendingSum(ws[:M * N].view(M, N), x2.dtype) if defer else out
        if cfg[0] == "gemv":
            gemv_kernel[grid](*common, N, n_blocks, per, BITS=bits, R=R, GB=G // (R * 32 // bits),
                              HAS_BIAS=bias is not None, ATOMIC=split > 1, BLOCK_N=cfg[1], BB=cfg[2],
                              STAGES=cfg[5], CHUNK=8, ASM=args["ASM"], DEFER=defer, num_warps=cfg[4],
                              **pdl_args(x2.device))
            return result
        if cfg[0] == "swapped":
            swapped_kernel[grid](*common, M, N, K, n_blocks, per, GB=G // (R * 8), R=R, HAS_BIAS=bias is not None,
                                 ATOMIC=split > 1, UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=cfg[1], ASM=args["ASM"],
                                 DEFER=defer, num_warps=cfg[3], num_stages=cfg[4], **pdl_args(x2.device))
            return result
        _, bn, _, warps, stages, prefetch = cfg
        fused_kernel[grid](*common, M, N, K, G, n_blocks, per, **args, HAS_BIAS=bias is not None,
                           ATOMIC=split > 1, UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=bn, PREFETCH=prefetch,
                           DEFER=defer, num_warps=warps, num_stages=stages, **pdl_args(x2.device))
        return result

    bucket = block_m(M) if M <= FUSED_MAX_M else "large"
    key = (bucket, N, K, G, bits, x2.dtype, str(x2.device))
    return key, candidates(M, N, K, R, x2.device, whole=args["G_BIG"], bits=bits), run


def clear_workspace(device):
    """Zero the split-K workspace of device: after deferred launches whose sums nobody takes (tuning, timing)."""
    if device in _workspaces:
        _workspaces[device][0].zero_()


def _linear_triton(x, qweight, scales, zeros, group_size, bias, bits, defer=False):
    qweight = _pack_w4(qweight, group_size) if bits == 4 else _pack_w8(qweight, group_size)
    N, K = qweight.shape[2], x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], N)
    weights = tuple(t.contiguous() for t in (qweight, scales, zeros) if t is not None)

    def plan_for(w):  # w: qweight, scales[, zeros]
        return plan(x2, w[0], w[1], w[2] if len(w) > 2 else None, bias, group_size, bits)

    key, cands, run = plan_for(weights)
    launch = cold_launcher(weights, lambda w: functools.partial(plan_for(w)[2], defer=defer))
    # tuned in the mode it runs: deferred timing runs end at their atomic adds, as in use, and leave sums behind
    cfg = _tuner.pick((*key, defer), cands, launch,
                      after_timing=(lambda: clear_workspace(x2.device)) if defer else None)
    y = run(cfg, defer)
    if isinstance(y, PendingSum):
        return PendingSum(y.sums.view(*x.shape[:-1], N), y.dtype)
    return y.view(*x.shape[:-1], N)


def w4a16_linear_triton(x, qweight, scales, zeros, group_size, bias=None, defer=False):
    return _linear_triton(x, qweight, scales, zeros, group_size, bias, 4, defer)


def w8a16_linear_triton(x, qweight, scales, group_size, bias=None, defer=False):
    return _linear_triton(x, qweight, scales, None, group_size, bias, 8, defer)


def w4a16_linear(x, qweight, scales, zeros, group_size, bias=None, defer=False):
    """x [..., K] @ W4 [K, N] -> [..., N] in x's dtype. qweight: engine or prepare_w4 layout. defer: a split-K
    launch may return a PendingSum for the next kernel to finish (pending.py; CUDA only)."""
    if use_triton(x):
        return w4a16_linear_triton(x, qweight, scales, zeros, group_size, bias, defer)
    if cpu_linear.is_packed_w4(qweight):
        return cpu_linear.w4_linear(x, qweight, scales, group_size, bias)
    return w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias)


def w8a16_linear(x, qweight, scales, group_size, bias=None, defer=False):
    """x [..., K] @ W8 [K, N] -> [..., N] in x's dtype. qweight: engine or prepare_w8 layout. defer: as
    w4a16_linear."""
    if use_triton(x):
        return w8a16_linear_triton(x, qweight, scales, group_size, bias, defer)
    if cpu_linear.is_packed_w8(scales):
        return cpu_linear.w8_linear(x, qweight, scales, bias)
    return w8a16_linear_ref(x, qweight, scales, group_size, bias)
