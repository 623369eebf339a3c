"""RMSNorm with an optional fused residual add, matching HF LlamaRMSNorm bit for bit.

HF order: residual = x + residual_in (in the model dtype), normalize in fp32, cast back to the model
dtype, then multiply by the weight (rounded to the model dtype again). The kernel keeps both roundings.
Works over the last dim of any shape, so Qwen3's per-head q/k norm is rms_norm on [T, H, D].
"""

import torch

from ._triton import next_pow2, pdl_args, pdl_wait, tl, triton, use_triton
from .pending import load_pending, unwrap


def rms_norm_ref(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * out.to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, D, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PENDING: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    # the weight and the residual (an earlier norm's output) load while the previous kernel finishes
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0)
    pdl_wait(PDL)
    x = load_pending(x_ptr + row * D + cols, mask, out_ptr, PENDING)
    if HAS_RES:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # rounded to the model dtype, as HF
        tl.store(res_out_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual=None):
    src, pending = unwrap(x)  # pending: a split-K linear's sums, read, rounded and zeroed by the kernel
    D = src.shape[-1]
    x2 = src.reshape(-1, D).contiguous()  # (the workspace view is contiguous: zeroes land in the workspace)
    out = torch.empty(x2.shape, dtype=x.dtype, device=src.device)
    res2 = residual.reshape(-1, D).contiguous() if residual is not None else x2
    res_out = torch.empty_like(out) if residual is not None else out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, D, eps,
                                         HAS_RES=residual is not None, BLOCK=next_pow2(D), PENDING=pending,
                                         num_warps=4, **pdl_args(src.device))
    out = out.view(src.shape)
    return out if residual is None else (out, res_out.view(src.shape))


def rms_norm(x, weight, eps, residual=None):
    """x [..., D] (or a PendingSum) -> out, or (out, x + residual) when residual is given. On a GPU with PDL
    the residual is read before the previous kernel has finished: it must come from an earlier one."""
    return (rms_norm_triton if use_triton(x) else rms_norm_ref)(x, weight, eps, residual)
