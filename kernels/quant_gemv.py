"""Triton kernels over the prepared (k-interleaved) W4 / W8 layouts; launch and tuning live in quant_linear.py.

Prepared layout: int32 [K / (P*R), R, N], P = 32 / BITS values per word (8 nibbles or 4 bytes). Value j of
word [b, r, n] (bits BITS*j .. BITS*j+BITS-1) is the code of W[b*P*R + j*R + r, n]. One [R, BN] word tile
therefore holds P sub-tiles of R consecutive k each, so x is read in contiguous slices, every word is
loaded once (16-byte vectors along N) and R % G == 0 keeps each sub-tile inside one quant group.
W8 bytes hold q + 128 (unsigned). Scales/zeros stay [K/G, N].

Unpacking costs one LOP3 per value (plus two shifts per word), no int->float convert: (w & (mask << p)) |
bits(2^(23-p)) read as fp32 is exactly 2^(23-p) + code (p is chosen per j in {8, 12, 16} so the value
sits inside the mantissa), and W = fma(s, that, -(2^(23-p) + zero) * s) is exact: s * (code - zero) is
representable in fp32 and the bias term is too (bf16 scales; fp16 scales use p in {12, 16} only).
"""

from ._triton import dot_acc, tl, triton


@triton.jit
def _dequant(w, s, z, J: tl.constexpr, BITS: tl.constexpr, SAFE: tl.constexpr):
    """Value J of the int32 word tile w [R, BN] as fp32 weights (q - z) * s; s, z are [1, BN] fp32."""
    # POS: where value J's lowest bit is moved to; A: the shift that moves it there
    if BITS == 8:  # fp16 scales: f * s must stay exact without an FMA, so at most 13 bits in f
        POS = 12 if SAFE else 8
        A = POS - 8 * J
    elif SAFE:  # fp16 scales: (z + 2^15) * s would round, keep to POS = 12 / 16
        if J == 0 or J == 1 or J == 3 or J == 5 or J == 7:
            POS = 12
        else:
            POS = 16
        A = POS - 4 * J
    else:
        if J == 0 or J == 2 or J == 5:
            POS = 8
        elif J == 1 or J == 3 or J == 6:
            POS = 12
        else:
            POS = 16
        A = POS - 4 * J
    if A > 0:
        v = w << A
    elif A < 0:
        v = w >> (-A)  # arithmetic shift: the sign bits land outside the mask
    else:
        v = w
    if POS == 8:
        MAGIC_BITS = 0x47000000
        MAGIC = 32768.0
    elif POS == 12:
        MAGIC_BITS = 0x45000000
        MAGIC = 2048.0
    else:
        MAGIC_BITS = 0x43000000
        MAGIC = 128.0
    MASK = ((1 << BITS) - 1) << POS
    f = ((v & MASK) | MAGIC_BITS).to(tl.float32, bitcast=True)
    if BITS == 8:
        return f * s - (MAGIC + 128.0) * s
    return f * s - (z + MAGIC) * s


@triton.jit
def _group(s_ptr, z_ptr, k, G, N, offs_n, mask_n, BITS: tl.constexpr):
    g = k // G
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if BITS == 4:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        z = s
    return s, z


@triton.jit
def _finish(acc, offs_m, offs_n, mask_m, mask_n, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr,
            HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Write the [BM, BN] fp32 tile acc (+ bias) to y. ATOMIC: split-K in one launch: partials go into the
    fp32 workspace by atomic add, the last program of a tile (per-tile counter) reads and zeroes the
    workspace, resets the counter and writes y, so the launch leaves both clean (graph safe)."""
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    write = True
    if ATOMIC:
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds precede the counter's release (as cooperative grid sync)
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        write = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == tl.num_programs(1) - 1
        if write:
            # on the int32 view of the workspace: the interpreter has no fp32 atomic_xchg
            acc = tl.atomic_xchg(ws_bits_ptr + offs, tl.zeros_like(acc).to(tl.int32), mask=mask)
            acc = tl.where(mask, acc.to(tl.float32, bitcast=True), 0.0)  # masked lanes return junk
            tl.atomic_xchg(cnt_ptr + tile, 0)
    if write:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)



@triton.jit
def fused_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, M, N, K, G, N_BLOCKS,
                 BLOCKS_PER_SPLIT, BITS: tl.constexpr, R: tl.constexpr, SAFE: tl.constexpr, G_BIG: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    """y[m-tile, n-tile] over K-blocks [pid_k*BPS, (pid_k+1)*BPS). BLOCK_M == 1: FMAs into an [R, BN]
    accumulator reduced once at the end (groups smaller than a block; else gemv_kernel); else tl.dot per
    sub-tile. PREFETCH: next block's words loaded by hand (else left to Triton's pipeliner)."""
    P: tl.constexpr = 32 // BITS
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_ptrs = qw_ptr + offs_r[:, None] * N + offs_n[None, :]
    x_rows = x_ptr + offs_m[:, None] * K
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, N_BLOCKS)
    if PREFETCH:
        w_next = tl.load(w_ptrs + b_begin * (R * N), mask=mask_n[None, :], other=0)
    for b in range(b_begin, b_end):
        # prefetch the next block's words: Triton does not pipeline loads that feed no tl.dot, and the
        # unpacking is long enough to hide a DRAM round trip behind it (the last one re-reads, from L2)
        if PREFETCH:
            w = w_next
            w_next = tl.load(w_ptrs + tl.minimum(b + 1, b_end - 1) * (R * N), mask=mask_n[None, :], other=0)
        else:
            w = tl.load(w_ptrs + b * (R * N), mask=mask_n[None, :], other=0)
        k0 = b * (P * R)
        if G_BIG:  # the whole block is one group
            s, z = _group(s_ptr, z_ptr, k0, G, N, offs_n, mask_n, BITS)
        for j in tl.static_range(P):
            if not G_BIG:
                s, z = _group(s_ptr, z_ptr, k0 + j * R, G, N, offs_n, mask_n, BITS)
            wj = _dequant(w, s, z, j, BITS, SAFE)
            k = k0 + j * R + offs_r
            if BLOCK_M == 1:
                acc += tl.load(x_ptr + k).to(tl.float32)[:, None] * wj
            else:
                xj = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
                acc = dot_acc(xj, wj.to(xj.dtype), acc, UPCAST)
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=0)[None, :]
    _finish(acc, offs_m, offs_n, mask_m, mask_n, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, HAS_BIAS, ATOMIC)


@triton.jit
def _code(w, wl8, wr8, w16, J: tl.constexpr, BITS: tl.constexpr):
    """Value J as fp32 MAGIC_J + code (one LOP3), from the word tile w and its rotations by 8 / -8 / 16.
    W4: codes land at bit 12 (MAGIC 2048, odd J) or 16 (128, even J); W8: at bit 8 (MAGIC 32768). The
    rotations serve two values each (three funnel shifts per word) and keep MAGIC small: the gemv sums
    MAGIC * x terms in fp32 and removes them once per block, so a smaller MAGIC loses fewer bits."""
    if BITS == 8:
        src = wl8 if J == 0 else w if J == 1 else wr8 if J == 2 else w16
        return ((src & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True)
    if J == 0 or J == 7:
        src = w16
    elif J == 1 or J == 2:
        src = wl8
    elif J == 3 or J == 4:
        src = w
    else:
        src = wr8
    if J % 2 == 1:
        return ((src & 0xF000) | 0x45000000).to(tl.float32, bitcast=True)
    return ((src & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, N, G, N_BLOCKS,
                BLOCKS_PER_SPLIT, BITS: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
                ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BB: tl.constexpr, CHUNK: tl.constexpr):
    """M = 1, a block never spans two groups (G % (P*R) == 0). Each step takes BB blocks as one [BB, R, BN]
    word tile (BB x the bytes per load; the next step's tile is prefetched). Per block and element:
    part = sum_j (MAGIC_j + q_j) * x_j (one LOP3 + one FMA per weight), acc += s * part;
    y = sum acc - sum_b s_b * (z_b * X_b + C_b), X_b = sum of x over the block, C_b = sum_j MAGIC_j *
    X_bj: the zero point and MAGIC terms are removed per column once, from block sums of x computed
    while the first words load."""
    P: tl.constexpr = 32 // BITS
    KB: tl.constexpr = P * R
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = offs_n[None, None, :]
    offs_b = tl.arange(0, BB)[:, None, None]
    offs_r = tl.arange(0, R)[None, :, None]
    w_ptrs = qw_ptr + (offs_b * R + offs_r) * N + cols
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, N_BLOCKS)
    w_next = tl.load(w_ptrs + b_begin * (R * N), mask=(b_begin + offs_b < b_end) & (cols < N), other=0)
    # per-column correction, CHUNK blocks at a time: x [CHUNK, KB] -> X_b, C_b -> sum_b s_b (z_b X_b + C_b)
    offs_c, offs_kk = tl.arange(0, CHUNK), tl.arange(0, KB)
    corr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(b_begin, b_end, CHUNK):
        blk = c + offs_c
        mask_b = blk < b_end
        xt = tl.load(x_ptr + blk[:, None] * KB + offs_kk[None, :], mask=mask_b[:, None], other=0.0).to(tl.float32)
        xsum = tl.sum(xt, axis=1)[:, None]
        sz = (blk * KB // G)[:, None] * N + offs_n[None, :]
        mask_sz = mask_b[:, None] & mask_n[None, :]
        s = tl.load(s_ptr + sz, mask=mask_sz, other=0.0).to(tl.float32)
        if BITS == 4:
            magic = tl.where((offs_kk // R) % 2 == 1, 2048.0, 128.0)
            cm = tl.sum(xt * magic[None, :], axis=1)[:, None]
            z = tl.load(z_ptr + sz, mask=mask_sz, other=0.0).to(tl.float32)
            corr += tl.sum(s * (z * xsum + cm), axis=0)
        else:  # MAGIC 32768 + the stored offset 128
            corr += tl.sum(s * xsum, axis=0) * 32896.0
    acc = tl.zeros((BB, R, BLOCK_N), dtype=tl.float32)
    for b0 in range(b_begin, b_end, BB):
        # prefetch by hand (Triton pipelines only loads feeding tl.dot); masked off past the split's end
        w = w_next.to(tl.uint32, bitcast=True)
        w_next = tl.load(w_ptrs + (b0 + BB) * (R * N), mask=(b0 + BB + offs_b < b_end) & (cols < N), other=0)
        blk = b0 + offs_b
        mask_b = blk < b_end
        s = tl.load(s_ptr + (blk * KB // G) * N + cols, mask=mask_b & (cols < N), other=0.0).to(tl.float32)
        x_ptrs = x_ptr + blk * KB + offs_r
        wl8, wr8, w16 = (w << 8) | (w >> 24), (w >> 8) | (w << 24), (w << 16) | (w >> 16)
        part = _code(w, wl8, wr8, w16, 0, BITS) * tl.load(x_ptrs, mask=mask_b, other=0.0).to(tl.float32)
        for j in tl.static_range(1, P):
            xj = tl.load(x_ptrs + j * R, mask=mask_b, other=0.0).to(tl.float32)
            part += _code(w, wl8, wr8, w16, j, BITS) * xj
        acc += s * part
    y = (tl.sum(tl.sum(acc, axis=1), axis=0) - corr)[None, :]
    offs_m = tl.arange(0, 1)
    _finish(y, offs_m, offs_n, offs_m < 1, mask_n, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, HAS_BIAS, ATOMIC)


@triton.jit
def dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, G, BITS: tl.constexpr, R: tl.constexpr, SAFE: tl.constexpr,
                   G_BIG: tl.constexpr, BLOCK_N: tl.constexpr):
    """Prepared layout -> W [K, N] in out's dtype (rounded like the reference), for cuBLAS at large M."""
    P: tl.constexpr = 32 // BITS
    b, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    mask_n = offs_n < N
    w = tl.load(qw_ptr + b * (R * N) + offs_r[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    k0 = b * (P * R)
    if G_BIG:
        s, z = _group(s_ptr, z_ptr, k0, G, N, offs_n, mask_n, BITS)
    for j in tl.static_range(P):
        if not G_BIG:
            s, z = _group(s_ptr, z_ptr, k0 + j * R, G, N, offs_n, mask_n, BITS)
        wj = _dequant(w, s, z, j, BITS, SAFE)
        rows = (k0 + j * R + offs_r).to(tl.int64)
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], wj.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])
