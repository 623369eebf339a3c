"""Where the Triton path runs: CUDA tensors with triton importable; everything else takes the torch reference."""

from __future__ import annotations

import functools
import os

import torch

# Under TRITON_INTERPRET=1 the kernels also run on CPU tensors; tests call the *_triton launchers directly.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Without a CUDA device or the interpreter nothing can launch a kernel: Triton is not imported (~70 MB of RSS),
# unless LMCONVERT_TRITON=1 asks for the real kernels anyway (ahead-of-time compiles on a CPU host).
WANT_TRITON = INTERPRET or os.environ.get("LMCONVERT_TRITON") == "1" or torch.cuda.is_available()

try:
    if not WANT_TRITON:
        raise ImportError("no CUDA device and no interpreter")
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    try:  # programmatic dependent launch (Triton >= 3.3)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:
        gdc_launch_dependents = gdc_wait = None
except ImportError:  # CPU-only hosts and installs (macOS, aarch64): kernels are defined but never launched
    from types import SimpleNamespace

    HAVE_TRITON = False
    gdc_launch_dependents = gdc_wait = None
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=None)


def use_triton(x) -> bool:
    """CUDA tensors, and inputs only a Triton kernel can take (pending.PendingSum)."""
    return HAVE_TRITON and (getattr(x, "triton_only", False) or x.is_cuda)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, looked up once (4 elsewhere: interpreter grids stay small)."""
    return _cuda_properties(_index(device)).multi_processor_count if device.type == "cuda" else 4


def pdl_args(device: torch.device) -> dict:
    """Launch options of a kernel that starts with pdl_wait: programmatic dependent launch on sm_90+ (off with
    LMCONVERT_PDL=0). The kernel is then launched while the previous one in the stream is still running, so
    its launch and whatever it does before pdl_wait (a GEMV loading its first weight tiles) hide behind that
    kernel. Decided once per device (the environment is read then): every launch asks."""
    return _pdl_args(_index(device)) if device.type == "cuda" else {"PDL": False}


@functools.cache
def _pdl_args(index: int) -> dict:
    on = gdc_wait is not None and not INTERPRET and os.environ.get("LMCONVERT_PDL", "1") != "0" \
        and _cuda_properties(index).major >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size (0 off CUDA)."""
    return _cuda_properties(_index(device)).L2_cache_size if device.type == "cuda" else 0


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel has finished and its writes are visible, then let the next
    kernel launch. Before this a kernel may read what kernels before the previous one wrote (the previous
    one waited here for them before it let this one launch), never the previous kernel's own output, and
    may write nothing an earlier kernel may still read."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. The CPU interpreter multiplies bf16 operands wrongly (Triton 3.9), so under
    TRITON_INTERPRET the operands go up to fp32: bf16 products are exact in fp32 either way."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
