"""PendingSum: a split-K linear's output left in its fp32 workspace for the next kernel to finish.

A split-K GEMV adds each program's partial sums into a zeroed fp32 workspace. Finishing inside the GEMV
(the last program of a column tile, found by a counter, reads the sums back, writes the output and zeroes
the workspace) is a chain of dependent L2 round trips that costs 2-3 us a call at batch 1 (docs/kernels.md).
With defer=True the linear stops after its atomic adds and returns a PendingSum instead; the kernel that
reads the output anyway (RMSNorm, SiLU-mul, RoPE + KV store) loads the sums through load_pending, which
rounds them to the model dtype as the GEMV's epilogue would have and zeroes them, so the workspace is clean
for the next GEMV.
Anything else takes take(x) first. Only the linear's next consumer may read it: the workspace is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import tl, triton


@dataclass(frozen=True, slots=True)
class PendingSum:
    sums: torch.Tensor  # fp32 view [..., N] of the split-K workspace
    dtype: torch.dtype  # the linear's output dtype

    @property
    def shape(self) -> torch.Size:
        return self.sums.shape

    # only Triton kernels make and take one (on CPU tensors too, under the interpreter): see use_triton
    triton_only = True


def unwrap(x) -> tuple[torch.Tensor, bool]:
    """(the tensor a consumer kernel reads, whether it holds pending sums to round and zero)."""
    return (x.sums, True) if isinstance(x, PendingSum) else (x, False)


@triton.jit
def load_pending(ptrs, mask, like_ptr, PENDING: tl.constexpr):
    """Values at ptrs (masked lanes 0). PENDING: fp32 sums, rounded to like_ptr's element type and zeroed."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if PENDING:
        # Triton may give the store another thread <-> address map than the load: every thread of the program
        # must have read before any zeroes (without this barrier the H100 read zeros: 0.14-0.33 rel. error)
        tl.debug_barrier()
        tl.store(ptrs, tl.zeros_like(x), mask=mask)
        x = x.to(like_ptr.dtype.element_ty)
    return x


@triton.jit
def _take_kernel(sums_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(out_ptr + offs, load_pending(sums_ptr + offs, mask, out_ptr, True), mask=mask)


def take(x):
    """x as a plain tensor: a PendingSum is finished (rounded, its workspace zeroed); tensors pass through."""
    if not isinstance(x, PendingSum):
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.sums.device)
    numel = out.numel()
    _take_kernel[(triton.cdiv(numel, 1024),)](x.sums, out, numel, BLOCK=1024, num_warps=4)
    return out
