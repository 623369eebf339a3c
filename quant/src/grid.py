"""The quantization grid of one linear: per-group scale and zero point fitted to the calibration inputs.

For each (output row, group of G input channels) the error that matters is the group's contribution to
the output, d^T H_g d with d = dequantized - w and H_g the inputs' second moment over that group. Two
steps minimize it:
- range search (AWQ's clip search, widened like llama.cpp's K-quant search): cut a fraction off the
  bottom and, independently, off the top of [min, max], from a grid of pairs, keep the best per group;
- least-squares refit: with the codes q fixed, w ~ s q + m is linear in (s, m), so the H_g-weighted
  best s and m have a closed form (2x2 normal equations); round again with them and refit, REFITS times.
Cutting both ends by one factor (the plain AWQ clip) misses the groups whose best grid drops an outlier
at one end only; the independent cuts lower d^T H_g d by about 10% on the calibration set *and* on
unseen text, because they pick a better grid rather than codes tuned to the calibration correlations.
The refit makes the zero point fractional. The engine stores zeros in the model dtype and every kernel
computes (q - z) * s in fp32, so that costs nothing (llama.cpp's K-quants likewise store a free minimum).
AutoAWQ and compressed-tensors store zero points as 4-bit integers, though: with integer zeros
(`quantize --integer-zeros`) the start grids keep an integer zero and the refits move the scale only.
"""

from __future__ import annotations

import torch

from lmconvert.quant.primitives import ROW_CHUNK, group_params

REFITS = 3
POLISH = 2  # more refits of each group's winning grid only (all start grids x 4 refits cost 24% more time)
MAX_CUT = 0.25  # at most this fraction of a group's range is cut off, both ends together


def _grouped(t: torch.Tensor, G: int) -> torch.Tensor:
    """[N, K] -> [K // G, N, G]: groups first, so a batched matmul applies each group's H_g."""
    N, K = t.shape
    return t.reshape(N, K // G, G).transpose(0, 1)


def group_error(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """d^T H_g d per (row, group) -> [N, K // G]."""
    d = _grouped(wq - w, gram.shape[-1])
    return ((d @ gram) * d).sum(-1).t()


class _GroupedRows:
    """A block of rows of w in the groups-first layout [K/G, N, G] (one contiguous copy, made once); scales and
    zeros here are [K/G, N]. The arithmetic is the plain formulas', in place where a temporary allows it."""

    def __init__(self, w: torch.Tensor, gram: torch.Tensor, bits: int, dtype: torch.dtype):
        self.w = _grouped(w.float(), gram.shape[-1]).contiguous()
        self.gram, self.qmax, self.dtype = gram, 2**bits - 1, dtype
        self.h1 = gram.sum(-1).unsqueeze(1)  # H_g 1, [K/G, 1, G]
        self.b2 = (self.h1 * self.w).sum(-1)  # 1^T H_g w

    def codes(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.div(self.w, s.unsqueeze(-1)).add_(z.unsqueeze(-1)).round_().clamp_(0, self.qmax)

    def error(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = self.codes(s, z).sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1)).sub_(self.w)  # wq - w
        return (d @ self.gram).mul_(d).sum(-1)

    def refit(self, s: torch.Tensor, z: torch.Tensor, fixed_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """H_g-weighted least-squares (s, z) for the codes of (s, z) (fixed_zero: s alone); groups where the fit
        is degenerate keep theirs."""
        q = self.codes(s, z)
        if fixed_zero:  # w ~ s (q - z) with z fixed
            a = q.sub_(z.unsqueeze(-1))
            ha = a @ self.gram
            num, den = (ha * self.w).sum(-1), ha.mul_(a).sum(-1)
            s_new = num / den.clamp(min=1e-30)
            return torch.where((den > 1e-20) & (s_new > 0), s_new.to(self.dtype).float(), s), z
        hq = q @ self.gram
        a12, b1 = hq.sum(-1), (hq * self.w).sum(-1)
        a11 = hq.mul_(q).sum(-1)
        a22 = self.h1.sum(-1)  # [K/G, 1]
        det = a11 * a22 - a12 * a12
        s_new = (a22 * b1 - a12 * self.b2) / det.where(det.abs() > 1e-20, torch.ones_like(det))
        ok = (det.abs() > 1e-20 * (a11 * a22).clamp(min=1e-30)) & (s_new > 0)
        s_new = torch.where(ok, s_new, s).to(self.dtype).float()
        m = (self.b2 - s_new * a12) / a22.clamp(min=1e-30)  # best offset for the rounded scale
        return s_new, torch.where(ok, (-m / s_new).to(self.dtype).float(), z)


def fit_grid(w: torch.Tensor, gram: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype, steps: int,
             max_shrink: float = 0.5, keep_rows: slice | None = None, integer_zero: bool = False):
    """Best (scales, zeros) [N, K // G] for w [N, K] given the group grams [K // G, G, G] (module docstring).

    steps: cuts per end of the range search (steps = 5: 0, 5, 10, 15, 20% of the range; pairs of them
    up to MAX_CUT in all, 15 start grids). Symmetric and integer-zero grids are shrunk toward zero by one
    factor in steps down to 1 - max_shrink instead (their zero point does not move freely).
    Rows in keep_rows keep the plain min/max grid (an option for q and k, whose error is amplified through
    the softmax). Rows are fitted a block at a time, which bounds the temporaries of a large linear.
    """
    parts = [_fit_rows(w[r:r + ROW_CHUNK], gram, bits, symmetric, dtype, steps, max_shrink, integer_zero)
             for r in range(0, w.shape[0], ROW_CHUNK)]
    best_s, best_z = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if keep_rows is not None:
        plain_s, plain_z = group_params(w[keep_rows], bits, gram.shape[-1], symmetric, 1.0, dtype, integer_zero)
        best_s[keep_rows], best_z[keep_rows] = plain_s, plain_z
    return best_s, best_z


def _start_grids(w, G, bits, symmetric, dtype, steps, max_shrink, integer_zero):
    """The range search's starting grids (scales, zeros), the plain min/max grid first."""
    if symmetric or integer_zero:
        for i in range(steps):
            yield group_params(w, bits, G, symmetric, 1.0 - max_shrink * i / steps, dtype, integer_zero)
        return
    wg = w.float().reshape(w.shape[0], -1, G)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    span = hi - lo
    cuts = [MAX_CUT * i / steps for i in range(steps)]
    for bottom in cuts:
        for top in cuts:
            if bottom + top <= MAX_CUT + 1e-9:
                scales = (span * (1 - bottom - top) / (2**bits - 1)).clamp(min=1e-10).to(dtype).float()
                yield scales, (-(lo + bottom * span) / scales).to(dtype).float()


def _fit_rows(w, gram, bits, symmetric, dtype, steps, max_shrink, integer_zero):
    rows = _GroupedRows(w, gram, bits, dtype)
    fixed_zero = symmetric or integer_zero  # refit the scale only: the zero point stays on its grid
    best = None  # (scales, zeros, error) per group, [K/G, N]

    def keep_better(s, z):
        err = rows.error(s, z)
        if best is None:
            return s, z, err
        better = err < best[2]
        return torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.where(better, err, best[2])

    for s, z in _start_grids(w, gram.shape[-1], bits, symmetric, dtype, steps, max_shrink, integer_zero):
        s, z = s.t().contiguous(), z.t().contiguous()
        if best is None:  # the plain grid, unrefitted, is the baseline every refit must beat
            best = keep_better(s, z)
        for _ in range(REFITS):
            s, z = rows.refit(s, z, fixed_zero)
        best = keep_better(s, z)
    s, z = best[0], best[1]
    for _ in range(POLISH):
        s, z = rows.refit(s, z, fixed_zero)
        best = keep_better(s, z)
    return best[0].t().contiguous(), best[1].t().contiguous()
