"""SwiGLU gate: [..., 2I] = gate ‖ up (the fused gate_up_proj output) -> silu(gate) * up."""

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton


def silu_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up  # two roundings in the model dtype, as HF's act_fn(gate) * up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * I + I + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (act * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_mul_triton(x):
    I = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * I).contiguous()
    out = torch.empty(x2.shape[0], I, dtype=x.dtype, device=x.device)
    BLOCK = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(I, BLOCK))](x2, out, I, BLOCK=BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], I)


def silu_mul(x):
    return (silu_mul_triton if use_triton(x) else silu_mul_ref)(x)
