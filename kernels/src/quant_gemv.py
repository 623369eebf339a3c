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

from ._triton import dot_acc, pdl_wait, tl, triton


@triton.jit
def _lop3(src, mask, magic, ASM: tl.constexpr):
    """(src & mask) | magic read as fp32, as one LOP3 with both constants in registers: written as two
    plain ops, ptxas fuses them with one constant as an immediate and re-materializes the other before
    every LOP3 (a MOV per weight, ~20% of the gemv's instructions). ASM off: the interpreter's path."""
    if ASM:
        f = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [src, mask, magic],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        f = ((src & mask) | magic).to(tl.float32, bitcast=True)
    return f


@triton.jit
def _dequant(w, s, z, J: tl.constexpr, BITS: tl.constexpr, SAFE: tl.constexpr, ASM: tl.constexpr):
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
    f = _lop3(v, ((1 << BITS) - 1) << POS, MAGIC_BITS, ASM)
    if BITS == 8:
        return f * s - (MAGIC + 128.0) * s
    return f * s - (z + MAGIC) * s


@triton.jit
def _group(s_ptr, z_ptr, k, G, N, offs_n, mask_n, BITS: tl.constexpr, COLUMN: tl.constexpr = False):
    """Scales and zeros (W8: scales twice) of group k // G, fp32, as [1, BN] rows or [BN, 1] columns."""
    g = k // G
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if BITS == 4:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        z = s
    if COLUMN:
        s, z = s[:, None], z[:, None]
    else:
        s, z = s[None, :], z[None, :]
    return s, z


@triton.jit
def _finish(acc, offs_m, offs_n, mask_m, mask_n, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr,
            HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, DEFER: tl.constexpr):
    """Write the [BM, BN] fp32 tile acc (+ bias) to y. ATOMIC: split-K in one launch: partials go into the
    fp32 workspace by atomic add, the last program of a tile (per-tile counter) reads and zeroes the
    workspace, resets the counter and writes y, so the launch leaves both clean (graph safe). DEFER (with
    ATOMIC): stop after the adds, the bias riding in split 0's partials; the consumer finishes (pending.py)."""
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    write = True
    if DEFER:
        if HAS_BIAS:
            if tl.program_id(1) == 0:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
        write = False
    elif ATOMIC:
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
                 BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr, DEFER: tl.constexpr,
                 PDL: tl.constexpr):
    """y[m-tile, n-tile] over K-blocks [pid_k*BPS, (pid_k+1)*BPS). BLOCK_M == 1: FMAs into an [R, BN]
    accumulator reduced once at the end (groups smaller than a block; else gemv_kernel); else tl.dot per
    sub-tile. PREFETCH: next block's words loaded by hand (else left to Triton's pipeliner)."""
    P: tl.constexpr = 32 // BITS
    pdl_wait(PDL)
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
            wj = _dequant(w, s, z, j, BITS, SAFE, ASM)
            k = k0 + j * R + offs_r
            if BLOCK_M == 1:
                acc += tl.load(x_ptr + k).to(tl.float32)[:, None] * wj
            else:
                xj = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
                acc = dot_acc(xj, wj.to(xj.dtype), acc, UPCAST)
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=0)[None, :]
    _finish(acc, offs_m, offs_n, mask_m, mask_n, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, HAS_BIAS, ATOMIC,
            DEFER)


@triton.jit
def _q_minus_z(w, zneg, B: tl.constexpr, FP16: tl.constexpr, ASM: tl.constexpr):
    """(q - z) exactly, in the activation dtype, for the low nibble of byte B of every word of w [BN, R] (pass
    w >> 4 for the high nibbles): tl.dot's A operand with no fp32 step. pack=2 gives each asm two elements
    (in the operand layout the k, k + 1 pair of one register; the asm is elementwise, so any pairing would
    be right): one PRMT gathers byte B of both words into the two halves, one LOP3 keeps the low nibbles
    under the magic exponent (bf16 0x4300 = 128: its mantissa has 7 bits, so a high nibble would reach the
    exponent; fp16 0x6400 = 1024), one x2 FMA adds zneg = -(MAGIC + z). Three instructions per two weights,
    against an LOP3 + FMA + half a convert per weight in _dequant."""
    if ASM:
        sel = tl.full(w.shape, B | ((4 + B) << 8), tl.int32)  # byte B of the first word -> byte 0, of the second -> 2
        if FP16:
            y = tl.inline_asm_elementwise(
                "{.reg .b32 t, one; prmt.b32 t, $1, $2, $4; lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA; "
                "mov.b32 one, 0x3C003C00; fma.rn.f16x2 $0, t, one, $3;}", "=r,r,r,r,r,r", [w, zneg, sel],
                dtype=tl.float16, is_pure=True, pack=2)
        else:
            y = tl.inline_asm_elementwise(
                "{.reg .b32 t, one; prmt.b32 t, $1, $2, $4; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
                "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, t, one, $3;}", "=r,r,r,r,r,r", [w, zneg, sel],
                dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        magic = 1024.0 if FP16 else 128.0
        y = (((w >> (8 * B)) & 0xF).to(tl.float32) + magic + zneg.to(tl.float32)).to(zneg.dtype)
    return y


@triton.jit
def swapped_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, M, N, K, N_BLOCKS,
                   BLOCKS_PER_SPLIT, GB: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
                   DEFER: tl.constexpr, PDL: tl.constexpr):
    """W4, 2 <= M <= 16, every 128-k block inside one group (GB blocks a group): y^T [BN, BM] = W^T x^T, the
    weights as tl.dot's first operand, which Triton keeps in registers (mma.sync; wgmma with A from registers
    at 4 warps): the word tile goes global -> shared (cp.async, pipelined since it feeds a dot) -> registers
    in the operand's layout and never round-trips through shared memory again, x^T is the shared operand.
    Per block: part = sum_j (q_j - z)^T x_j^T with exact (q - z) operands (_q_minus_z), acc += s * part."""
    pdl_wait(PDL)
    FP16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    w_ptrs = qw_ptr + offs_r[None, :] * N + offs_n[:, None]  # [BN, R] words: W^T's k runs along the rows r
    x_cols = x_ptr + offs_m[None, :] * K
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, N_BLOCKS)
    for b in range(b_begin, b_end):
        w = tl.load(w_ptrs + b * (R * N), mask=mask_n[:, None], other=0)
        s, z = _group(s_ptr, z_ptr, b, GB, N, offs_n, mask_n, 4, COLUMN=True)
        zneg = tl.broadcast_to((-(1024.0 if FP16 else 128.0) - z).to(x_ptr.dtype.element_ty), (BLOCK_N, R))
        w_hi = w >> 4
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_cols + (b * 8 * R + j * R + offs_r)[:, None], mask=mask_m[None, :], other=0.0)  # [R, BM]
            part = dot_acc(_q_minus_z(w if j % 2 == 0 else w_hi, zneg, j // 2, FP16, ASM), xj, part, UPCAST)
        acc += part * s
    _finish(tl.trans(acc), offs_m, offs_n, mask_m, mask_n, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr,
            HAS_BIAS, ATOMIC, DEFER)


@triton.jit
def _rotations(w):
    """The word tile and its rotations by 8 / -8 / 16 (one funnel shift each)."""
    return w, (w << 8) | (w >> 24), (w >> 8) | (w << 24), (w << 16) | (w >> 16)


@triton.jit
def _code(words, J: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """Value J as fp32 MAGIC_J + code (one LOP3), from the word tile and its rotations (`_rotations`).
    W4: codes land at bit 12 (MAGIC 2048, odd J) or 16 (128, even J); W8: at bit 8 (MAGIC 32768). The
    rotations serve two values each (three funnel shifts per word) and keep MAGIC small: the gemv sums
    MAGIC * x terms in fp32 and removes them once per block, so a smaller MAGIC loses fewer bits."""
    w, wl8, wr8, w16 = words
    if BITS == 8:
        src = wl8 if J == 0 else w if J == 1 else wr8 if J == 2 else w16
        f = _lop3(src, 0xFF00, 0x47000000, ASM)
    else:
        if J == 0 or J == 7:
            src = w16
        elif J == 1 or J == 2:
            src = wl8
        elif J == 3 or J == 4:
            src = w
        else:
            src = wr8
        if J % 2 == 1:
            f = _lop3(src, 0xF000, 0x45000000, ASM)
        else:
            f = _lop3(src, 0xF0000, 0x43000000, ASM)
    return f


@triton.jit
def _correction_term(s_ptr, z_ptr, N, group, mask_b, offs_n, xsum, cm, BITS: tl.constexpr):
    """sum over a chunk's blocks of s_b * (z_b * X_b + C_b) for the columns offs_n."""
    sz = group[:, None] * N + offs_n[None, :]
    mask_sz = mask_b[:, None] & (offs_n < N)[None, :]
    s = tl.load(s_ptr + sz, mask=mask_sz, other=0.0).to(tl.float32)
    if BITS == 4:
        z = tl.load(z_ptr + sz, mask=mask_sz, other=0.0).to(tl.float32)
        term = tl.sum(s * (z * xsum + cm), axis=0)
    else:  # MAGIC 32768 + the stored offset 128
        term = tl.sum(s * xsum, axis=0) * 32896.0
    return term


@triton.jit
def _correction(x_ptr, s_ptr, z_ptr, N, b_begin, b_end, offs_a, offs_b, BITS: tl.constexpr, R: tl.constexpr,
                GB: tl.constexpr, CHUNK: tl.constexpr):
    """Both column halves' sum_b s_b * (z_b * X_b + C_b) over blocks [b_begin, b_end), CHUNK blocks at a
    time; the block sums of x (X_b, C_b) are computed once for both."""
    KB: tl.constexpr = 32 // BITS * R
    offs_c, offs_kk = tl.arange(0, CHUNK), tl.arange(0, KB)
    corr_a = tl.zeros(offs_a.shape, dtype=tl.float32)
    corr_b = tl.zeros(offs_b.shape, dtype=tl.float32)
    for c in range(b_begin, b_end, CHUNK):
        blk = c + offs_c
        mask_b = blk < b_end
        xt = tl.load(x_ptr + blk[:, None] * KB + offs_kk[None, :], mask=mask_b[:, None], other=0.0).to(tl.float32)
        xsum = tl.sum(xt, axis=1)[:, None]
        if BITS == 4:
            magic = tl.where((offs_kk // R) % 2 == 1, 2048.0, 128.0)
            cm = tl.sum(xt * magic[None, :], axis=1)[:, None]
        else:
            cm = xsum  # unused: W8's MAGIC and offset are one constant
        corr_a += _correction_term(s_ptr, z_ptr, N, blk // GB, mask_b, offs_a, xsum, cm, BITS)
        corr_b += _correction_term(s_ptr, z_ptr, N, blk // GB, mask_b, offs_b, xsum, cm, BITS)
    return corr_a, corr_b


@triton.jit
def _accumulate(acc_a, acc_b, wa, wb, x_ptr, s_ptr, N, blk, mask_b, offs_r, cols_a, cols_b, BITS: tl.constexpr,
                R: tl.constexpr, GB: tl.constexpr, ASM: tl.constexpr):
    """acc += s * sum_j (MAGIC_j + q_j) * x_j for the blocks blk of both column halves' word tiles."""
    KB: tl.constexpr = 32 // BITS * R
    wa = _rotations(wa.to(tl.uint32, bitcast=True))
    wb = _rotations(wb.to(tl.uint32, bitcast=True))
    group = (blk // GB) * N
    s_a = tl.load(s_ptr + group + cols_a, mask=mask_b & (cols_a < N), other=0.0).to(tl.float32)
    s_b = tl.load(s_ptr + group + cols_b, mask=mask_b & (cols_b < N), other=0.0).to(tl.float32)
    x_ptrs = x_ptr + blk * KB + offs_r
    xj = tl.load(x_ptrs, mask=mask_b, other=0.0).to(tl.float32)
    part_a = _code(wa, 0, BITS, ASM) * xj
    part_b = _code(wb, 0, BITS, ASM) * xj
    for j in tl.static_range(1, 32 // BITS):
        xj = tl.load(x_ptrs + j * R, mask=mask_b, other=0.0).to(tl.float32)
        part_a += _code(wa, j, BITS, ASM) * xj
        part_b += _code(wb, j, BITS, ASM) * xj
    return acc_a + s_a * part_a, acc_b + s_b * part_b


@triton.jit
def gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, N, N_BLOCKS,
                BLOCKS_PER_SPLIT, BITS: tl.constexpr, R: tl.constexpr, GB: tl.constexpr, HAS_BIAS: tl.constexpr,
                ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BB: tl.constexpr, STAGES: tl.constexpr,
                CHUNK: tl.constexpr, ASM: tl.constexpr, DEFER: tl.constexpr, PDL: tl.constexpr):
    """M = 1, a block never spans two groups: GB blocks a group (a constexpr: no division by a runtime G in
    the loop). Each step takes BB blocks as two [BB, R, BN/2] word tiles, columns n0.. and n0 + BN/2..:
    equal shapes get equal layouts, so each thread holds the same rows of both and one x load serves twice
    the weights. STAGES 0: the next step's tiles are prefetched by hand into registers; else Triton's
    pipeliner keeps STAGES - 1 steps in flight through shared memory (cp.async).
    Per block and element: part = sum_j (MAGIC_j + q_j) * x_j (one LOP3 + one FMA per weight),
    acc += s * part; y = sum acc - sum_b s_b * (z_b * X_b + C_b), X_b = sum of x over the block,
    C_b = sum_j MAGIC_j * X_bj: the zero point and MAGIC terms are removed per column once, from block
    sums of x computed while the first words load."""
    HALF: tl.constexpr = BLOCK_N // 2
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_a = pid_n * BLOCK_N + tl.arange(0, HALF)
    offs_b = offs_a + HALF
    cols_a, cols_b = offs_a[None, None, :], offs_b[None, None, :]
    step_blocks = tl.arange(0, BB)[:, None, None]  # the BB blocks of a step
    offs_r = tl.arange(0, R)[None, :, None]
    rows = qw_ptr + (step_blocks * R + offs_r) * N
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, N_BLOCKS)
    acc_a = tl.zeros((BB, R, HALF), dtype=tl.float32)
    acc_b = tl.zeros((BB, R, HALF), dtype=tl.float32)
    if STAGES == 0:
        live = b_begin + step_blocks < b_end
        wa_next = tl.load(rows + cols_a + b_begin * (R * N), mask=live & (cols_a < N), other=0)
        wb_next = tl.load(rows + cols_b + b_begin * (R * N), mask=live & (cols_b < N), other=0)
    pdl_wait(PDL)  # the first words (never written) may load while the previous kernel finishes; x may not
    corr_a, corr_b = _correction(x_ptr, s_ptr, z_ptr, N, b_begin, b_end, offs_a, offs_b, BITS, R, GB, CHUNK)
    if STAGES == 0:
        for b0 in range(b_begin, b_end, BB):
            wa, wb = wa_next, wb_next
            live = b0 + BB + step_blocks < b_end  # masked off past the split's end: no wasted re-load
            words = rows + (b0 + BB) * (R * N)
            wa_next = tl.load(words + cols_a, mask=live & (cols_a < N), other=0)
            wb_next = tl.load(words + cols_b, mask=live & (cols_b < N), other=0)
            blk = b0 + step_blocks
            acc_a, acc_b = _accumulate(acc_a, acc_b, wa, wb, x_ptr, s_ptr, N, blk, blk < b_end, offs_r, cols_a, cols_b,
                                       BITS, R, GB, ASM)
    else:
        for b0 in tl.range(b_begin, b_end, BB, num_stages=STAGES):
            live = b0 + step_blocks < b_end
            words = rows + b0 * (R * N)
            wa = tl.load(words + cols_a, mask=live & (cols_a < N), other=0)
            wb = tl.load(words + cols_b, mask=live & (cols_b < N), other=0)
            acc_a, acc_b = _accumulate(acc_a, acc_b, wa, wb, x_ptr, s_ptr, N, b0 + step_blocks, live, offs_r, cols_a,
                                       cols_b, BITS, R, GB, ASM)
    y_a = tl.sum(tl.sum(acc_a, axis=1), axis=0) - corr_a
    y_b = tl.sum(tl.sum(acc_b, axis=1), axis=0) - corr_b
    # both halves as one [1, BN] row for the shared epilogue (any order: columns travel with their values)
    y = tl.reshape(tl.join(y_a, y_b), (1, BLOCK_N))
    offs_n = tl.reshape(tl.join(offs_a, offs_b), (BLOCK_N,))
    offs_m = tl.arange(0, 1)
    _finish(y, offs_m, offs_n, offs_m < 1, offs_n < N, N, bias_ptr, out_ptr, ws_ptr, ws_bits_ptr, cnt_ptr, HAS_BIAS,
            ATOMIC, DEFER)


@triton.jit
def dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, G, BITS: tl.constexpr, R: tl.constexpr, SAFE: tl.constexpr,
                   G_BIG: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
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
        wj = _dequant(w, s, z, j, BITS, SAFE, ASM)
        rows = (k0 + j * R + offs_r).to(tl.int64)
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], wj.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])
