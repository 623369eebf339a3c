"""SwiGLU gate: [..., 2I] = gate ‖ up (the fused gate_up_proj output) -> silu(gate) * up."""

import torch
import torch.nn.functional as F

from ._triton import pdl_args, pdl_wait, tl, triton, use_triton
from .pending import load_pending, unwrap


def silu_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up  # two roundings in the model dtype, as HF's act_fn(gate) * up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr, PENDING: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = load_pending(x_ptr + row * 2 * I + cols, mask, out_ptr, PENDING).to(tl.float32)
    up = load_pending(x_ptr + row * 2 * I + I + cols, mask, out_ptr, PENDING)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (act * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_mul_triton(x):
    src, pending = unwrap(x)  # pending: a split-K linear's sums, read, rounded and zeroed by the kernel
    I = src.shape[-1] // 2
    x2 = src.reshape(-1, 2 * I).contiguous()
    out = torch.empty(x2.shape[0], I, dtype=x.dtype, device=src.device)
    BLOCK = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(I, BLOCK))](x2, out, I, BLOCK=BLOCK, PENDING=pending, num_warps=4,
                                                                 **pdl_args(src.device))
    return out.view(*src.shape[:-1], I)


def silu_mul(x):
    """x [..., 2I] (or a PendingSum) -> [..., I]."""
    return (silu_mul_triton if use_triton(x) else silu_mul_ref)(x)
