"""--device for every command: one rule for the default and one line for a device this host cannot use; the
CPU's defaults (compute dtype, threads, oneDNN's cache). Imports torch only when called: the CLI's entry point
imports this module and must stay quick for `--help`."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmconvert.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | torch.device | None) -> torch.device:
    """None / "auto": cuda when a GPU is visible, else cpu. A CUDA device on a CPU-only torch build or a host
    without that GPU is a UserError (torch's own message is a long traceback from deep inside the first copy)."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name}: choose cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UserError(f"--device {name}: this torch ({torch.__version__}) is a CPU-only build; "
                            "install a CUDA build of torch to use a GPU")
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible on this host")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this host has {torch.cuda.device_count()} GPU(s)")
    return device


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 natively (oneDNN's check), so bf16 runs there at full speed."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device, engine_dtype: torch.dtype) -> torch.dtype:
    """GPUs compute in the engine's dtype; CPUs too where they have native bf16 (a bf16 / fp16 engine runs bf16),
    else fp32, as llama.cpp does (emulated bf16 / fp16 matmuls are several times slower than fp32)."""
    import torch

    if device.type == "cuda" or engine_dtype == torch.float32:
        return engine_dtype
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_ENTRIES = 64  # oneDNN's default, 1,024, keeps a matmul primitive (and its memory) per shape seen


def bound_onednn_cache() -> None:
    """A server sees a new matmul shape for every prefill length and batch size: with oneDNN's default cache (1,024
    primitives) its RSS grew ~105 MB a 5,000-request flood (SmolLM2 bf16); with 64, four 300-request rounds
    stayed within 4 MB (8 re-creates primitives often and grew 19 MB). oneDNN reads it once, at its first
    primitive: the CLI calls this at entry, LLMEngine before loading; a value the user set wins."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_ENTRIES))


_malloc_trim = None  # libc's, looked up on first use (False: not glibc)


def release_free_heap() -> None:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). A burst of requests
    frees tensors of many sizes into the heap, where they count in RSS until reused: a server calls this when
    it turns idle, so its RSS shows what it holds. Takes a few milliseconds."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def physical_cores() -> int:
    """Cores this process may run on, one per physical core (hyper-threads share a core's vector units: a second
    thread per core slows matmul-bound decoding down)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))
