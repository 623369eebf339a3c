"""Per-step attention metadata, set by the model runner and read by every attention layer.

Keeping it in one module-level slot (as nano-vllm does; one per thread) keeps each layer's forward `(positions, hidden)`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Context:
    # Flattened batch: sequence s owns rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of the step's tokens.
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    # Paged mode (KV cache present): where each new token's K/V goes and what each sequence attends to.
    slot_mapping: torch.Tensor | None = None  # int64 [T]
    block_tables: torch.Tensor | None = None  # int32 [B, max_blocks]
    context_lens: torch.Tensor | None = None  # int32 [B]: cached prefix + new tokens
    max_query_len: int = 0  # host-side copies, so kernels/refs need no device sync
    is_decode: bool = False  # every sequence has exactly one new token
    decode_rows: int = 0  # leading sequences with one new token (a mixed step's decodes: the decode kernel)

    @property
    def paged(self) -> bool:
        return self.slot_mapping is not None


# one slot per thread: the CPU decode step is compiled on a thread of its own while steps run eagerly
_local = threading.local()


def set_context(ctx: Context | None) -> None:
    _local.ctx = ctx


def get_context() -> Context:
    ctx = getattr(_local, "ctx", None)
    assert ctx is not None, "model called outside a step: no attention context set"
    return ctx


def reset_context() -> None:
    set_context(None)


@contextmanager
def use_context(ctx: Context):
    """The model calls inside the block see ctx; it is cleared afterwards even on error."""
    set_context(ctx)
    try:
        yield ctx
    finally:
        reset_context()


def leading_decodes(cu: list[int]) -> int:
    """How many leading sequences of cu_seqlens (a host list) have exactly one new token."""
    n = 0
    while n + 1 < len(cu) and cu[n + 1] - cu[n] == 1:
        n += 1
    return n


def query_hints(cu: list[int]) -> dict[str, int]:
    """A step's host-side facts for the attention kernels (so they need no device sync), from its cu_seqlens
    as a host list: the longest query and how many leading sequences decode."""
    return {"max_query_len": max(b - a for a, b in zip(cu, cu[1:])), "decode_rows": leading_decodes(cu)}


def dense_context(seq_lens: list[int], device) -> Context:
    """Context for running the model over whole sequences with no KV cache (eval, calibration)."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
    return Context(cu_seqlens_q=cu.to(device), max_query_len=max(seq_lens))
