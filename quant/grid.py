"""The quantization grid of one linear: per-group scale and zero point fitted to the calibration inputs.

For each (output row, group of G input channels) the error that matters is the group's contribution to
the output, d^T H_g d with d = dequantized - w and H_g the inputs' second moment over that group. Two
steps minimize it:
- range search (AWQ's clip search): shrink [min, max] by a factor from a grid, keep the best per group;
- least-squares refit: with the codes q fixed, w ~ s q + m is linear in (s, m), so the H_g-weighted
  best s and m have a closed form (2x2 normal equations); round again with them, refit once more.
The refit makes the zero point fractional. The engine stores zeros in the model dtype and every kernel
computes (q - z) * s in fp32, so that costs nothing (llama.cpp's K-quants likewise store a free minimum).
"""

from __future__ import annotations

import torch

from lmconvert.quant.primitives import ROW_CHUNK, grid_values, group_params, round_to_grid

REFITS = 2


def _grouped(t: torch.Tensor, G: int) -> torch.Tensor:
    """[N, K] -> [K // G, N, G]: groups first, so a batched matmul applies each group's H_g."""
    N, K = t.shape
    return t.reshape(N, K // G, G).transpose(0, 1)


def group_error(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """d^T H_g d per (row, group) -> [N, K // G]."""
    d = _grouped(wq - w, gram.shape[-1])
    return ((d @ gram) * d).sum(-1).t()


def refit(w: torch.Tensor, q: torch.Tensor, gram: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
          symmetric: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """H_g-weighted least-squares (s, z) for fixed codes q; groups where the fit is degenerate keep theirs."""
    G = gram.shape[-1]
    qg, wg = _grouped(q, G), _grouped(w, G)  # [K/G, N, G]
    if symmetric:  # w ~ s (q - z) with z fixed
        a = qg - zeros.t().unsqueeze(-1)
        ha = a @ gram
        num, den = (ha * wg).sum(-1), (ha * a).sum(-1)
        s = (num / den.clamp(min=1e-30)).t()
        ok = (den.t() > 1e-20) & (s > 0)
        return torch.where(ok, s.to(dtype).float(), scales), zeros
    hq = qg @ gram
    h1 = gram.sum(-1).unsqueeze(1)  # H_g 1, [K/G, 1, G]
    a11, a12, a22 = (hq * qg).sum(-1), hq.sum(-1), h1.sum(-1)
    b1, b2 = (hq * wg).sum(-1), (h1 * wg).sum(-1)
    det = a11 * a22 - a12 * a12
    s = ((a22 * b1 - a12 * b2) / det.where(det.abs() > 1e-20, torch.ones_like(det))).t()
    ok = (det.t().abs() > 1e-20 * (a11 * a22).t().clamp(min=1e-30)) & (s > 0)
    s = torch.where(ok, s, scales).to(dtype).float()
    m = ((b2 - s.t() * a12) / a22.clamp(min=1e-30)).t()  # best offset for the rounded scale
    z = torch.where(ok, (-m / s).to(dtype).float(), zeros)
    return s, z


def fit_grid(w: torch.Tensor, gram: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype, steps: int,
             max_shrink: float = 0.5, keep_rows: slice | None = None, integer_zero: bool = False):
    """Best (scales, zeros) [N, K // G] for w [N, K] given the group grams [K // G, G, G] (module docstring).

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


def _fit_rows(w, gram, bits, symmetric, dtype, steps, max_shrink, integer_zero):
    G = gram.shape[-1]
    best_s, best_z = group_params(w, bits, G, symmetric, 1.0, dtype, integer_zero)
    best_err = group_error(w, grid_values(round_to_grid(w, best_s, best_z, bits), best_s, best_z), gram)
    for i in range(steps):
        s, z = group_params(w, bits, G, symmetric, 1.0 - max_shrink * i / steps, dtype, integer_zero)
        for _ in range(REFITS):
            s, z = refit(w, round_to_grid(w, s, z, bits), gram, s, z, symmetric, dtype)
        err = group_error(w, grid_values(round_to_grid(w, s, z, bits), s, z), gram)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
