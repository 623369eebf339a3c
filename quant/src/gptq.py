"""Error-compensating rounding (the GPTQ update, Frantar et al. 2022) on a fixed group grid.

Rounding columns one at a time and pushing each column's rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's inputs, minimizes ||X W^T - X Q^T||^2 far
better than rounding each weight to its nearest grid point. The grid (scales and zeros per group) is
fixed beforehand by the AWQ clip search, so the result is stored in the ordinary W4 layout.
"""

from __future__ import annotations

import torch

from lmconvert.quant.primitives import grid_values

BLOCK = 32  # columns rounded one by one before the lazy rank-BLOCK update of the rest (small: cheap on CPU)
DAMP = 0.01  # fraction of the mean diagonal added to H, so that it is safely positive definite


def hessian(x: torch.Tensor) -> torch.Tensor:
    """Second moment of the inputs x [T, K] -> [K, K] fp32 (the Hessian of the squared output error, / 2T)."""
    x = x.float()
    return (x.t() @ x) / x.shape[0]


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks of hessian(x), one per input group: [K // G, G, G]; cheap (no cross-group terms)."""
    T, K = x.shape
    xg = x.float().reshape(T, K // group_size, group_size).permute(1, 2, 0)
    return (xg @ xg.transpose(1, 2)) / T


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, damped more if H is too close to singular."""
    damp = DAMP * H.diagonal().mean()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)  # faster than cholesky_inverse on CPU
            return torch.linalg.cholesky(L_inv.t() @ L_inv, upper=True)
        damp *= 10
    raise RuntimeError("GPTQ: input Hessian is not positive definite even after damping")


def gptq_round(w: torch.Tensor, H: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N, K], H [K, K], grid scales/zeros [N, K // G] -> integer codes [N, K] (float) on that grid."""
    N, K = w.shape
    G = K // scales.shape[1]
    qmax = 2**bits - 1
    wt = w.float().t().contiguous()  # [K, N]: input channel k is row k, so every update below is contiguous
    scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()
    H = H.float().clone()
    dead = H.diagonal() == 0  # channels never active in calibration: any value is as good
    H[dead, dead] = 1.0
    wt[dead] = 0.0
    U = _inverse_cholesky(H)
    codes = torch.empty_like(wt)
    for start in range(0, K, BLOCK):
        end = min(start + BLOCK, K)
        block = wt[start:end].clone()
        errors = torch.empty_like(block)
        Ub = U[start:end, start:end]
        for j in range(end - start):
            s, z = scales_t[(start + j) // G], zeros_t[(start + j) // G]
            q = torch.round(block[j] / s + z).clamp_(0, qmax)
            codes[start + j] = q
            err = (block[j] - (q - z) * s) / Ub[j, j]
            block[j + 1:].addr_(Ub[j, j + 1:], err, alpha=-1)
            errors[j] = err
        wt[end:] -= U[start:end, end:].t() @ errors
    return codes.t()


def output_error(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 H: torch.Tensor) -> float:
    """Mean squared output error per row, tr(D H D^T) / N with D = dequantized - w: how good a rounding is."""
    d = grid_values(codes, scales, zeros) - w.float()
    return ((d @ H) * d).sum().item() / w.shape[0]
