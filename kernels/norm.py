"""RMSNorm with an optional fused residual add, matching HF LlamaRMSNorm bit for bit.

HF order: residual = x + residual_in (in the model dtype), normalize in fp32, cast back to the model
dtype, then multiply by the weight (rounded to the model dtype again). The kernel keeps both roundings.
Works over the last dim of any shape, so Qwen3's per-head q/k norm is rms_norm on [T, H, D].
"""

import torch

from ._triton import tl, triton, next_pow2, use_triton


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
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # rounded to the model dtype, as HF
        tl.store(res_out_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual=None):
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, D).contiguous() if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, D, eps,
                                         HAS_RES=residual is not None, BLOCK=next_pow2(D), num_warps=4)
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def rms_norm(x, weight, eps, residual=None):
    """x [..., D] -> out, or (out, x + residual) when residual is given."""
    return (rms_norm_triton if use_triton(x) else rms_norm_ref)(x, weight, eps, residual)
