"""The CPU's decode fast path, beside cuda_graphs.py: the decode step compiled ahead of time (AOTInductor) into
a shared library that is cached on disk and loaded without torch's compiler.

Eager, a decode step of a small model is ~20 Python-dispatched ops a layer, each costing more than its math
(SmolLM2: ~600 ops a token). Inductor turns the step into generated C++/OpenMP loops, elementwise chains
fused, around the matmuls (oneDNN, ATen's packed int4 / int8), called from C++.

The step is exported (torch.export) as a function of its five inputs *and of every tensor the model holds*
(weights, packed weights, KV pools, rope tables), so the library embeds no weights (~5 MB for SmolLM2), writes
the KV pools in place, and serves any engine with the same config, tensor shapes and dtypes. It is cached under
~/.cache/lmconvert/aot (keyed by torch's version, the CPU's instruction sets, the thread count, the model's config and
tensors, and this package's runtime and kernel sources). A cached library is loaded when the engine starts
(milliseconds): the step is compiled from the first token on, and the process never imports torch's compiler
(~190 MB of RSS, seconds to import).

A step not yet cached compiles on a thread of its own, on a scratch KV block, while steps run eagerly: no answer
waits for it, and once a batch shape is compiled its decode steps switch over. A graph starts compiling once the
engine has decoded COMPILE_AFTER_STEPS steps eagerly (a one-question chat never compiles, and its first answer
does not share the cores with the compiler); the batch-1 and larger-batch graphs separately (a chat never needs
the second). A model the exporter cannot take whole (MoE: the CPU experts loop over the experts that got tokens,
a data-dependent loop) is compiled by torch.compile instead, which breaks the graph there (inductor's cache,
TORCHINDUCTOR_CACHE_DIR; traced again on every start).

Shapes: the block-table width and the KV pools' block count are dynamic (one library whatever the context
length or --session-len; the width padded to at least 2 columns, as a dimension of 1 would be specialised);
batch 1 has its library, larger batches share one with a dynamic batch dim. Attention runs
kernels.paged_attention's tensor-only decode path (no host reads).
"""

from __future__ import annotations

# their exit hooks must be registered before ours (see _finish_at_exit), and a compile still running at exit would
# import them too late to register at all
import concurrent.futures.process
import concurrent.futures.thread  # noqa: F401
import contextlib
import copy
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import weakref
import zipfile
from pathlib import Path

import torch
from torch import nn

from lmconvert.runtime.context import Context, use_context

log = logging.getLogger(__name__)
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own files (the AOT build's scratch, torch.compile's cache)
MIN_WIDTH = 2
# Decode steps run eagerly before a graph starts compiling: a short exchange (a one-question chat, a first short
# answer) is not slowed by the compile competing for the cores, and never waits for it at exit.
COMPILE_AFTER_STEPS = 32
KV_POOLS = ("k_cache", "v_cache", "k_scales", "v_scales")  # attention attributes whose block count is dynamic
STALE_DAYS = 30  # a cached library no engine loaded for this long is removed when another is built


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every CompiledDecode, for compiling()


def compiling() -> bool:
    """A compile is running on some engine's background thread (a process leaving now would wait for it)."""
    return any(t.is_alive() for compiled in list(_LIVE) for t in compiled._threads.values())


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmconvert"


def default_cache_dir() -> Path:
    return cache_root() / "inductor"


def model_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every tensor the model holds: parameters, buffers and plain attributes (packed
    weights, KV pools), in module order. The exported step takes them as inputs, after its own five."""
    slots = []
    for module in model.modules():
        for name in dict.fromkeys([*module._parameters, *module._buffers, *vars(module)]):
            if isinstance(getattr(module, name, None), torch.Tensor):
                slots.append((module, name))
    return slots


def _bind(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    table = module._parameters if name in module._parameters else module._buffers if name in module._buffers else None
    if table is None:
        object.__setattr__(module, name, tensor)
    else:
        table[name] = tensor


def decode_context(slot_mapping, context_lens, block_tables) -> Context:
    bs = slot_mapping.shape[0]
    return Context(cu_seqlens_q=torch.arange(bs + 1, dtype=torch.int32), slot_mapping=slot_mapping,
                   block_tables=block_tables, context_lens=context_lens, max_query_len=1, is_decode=True,
                   decode_rows=bs)


class ExportableStep(nn.Module):
    """The decode step as a function of its inputs and of the model's tensors. It runs a copy of the model's
    modules that shares their tensors, so binding export's traced stand-ins there leaves the live model (still
    decoding eagerly on another thread) alone; the copy is not a submodule, so export lifts nothing from it."""

    def __init__(self, model: nn.Module, slots: list[tuple[nn.Module, str]]):
        super().__init__()
        shared = {id(getattr(m, name)): getattr(m, name) for m, name in slots}
        twin = copy.deepcopy(model, shared)
        index = {id(m): i for i, m in enumerate(model.modules())}
        twins = list(twin.modules())
        object.__setattr__(self, "twin", twin)
        self.slots = [(twins[index[id(m)]], name) for m, name in slots]

    def forward(self, input_ids, positions, slot_mapping, context_lens, block_tables, *tensors):
        for (module, name), tensor in zip(self.slots, tensors):
            _bind(module, name, tensor)
        with use_context(decode_context(slot_mapping, context_lens, block_tables)):
            return self.twin.compute_logits(self.twin(input_ids, positions))


def example_inputs(bs: int, scratch_block: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """A decode step's five inputs for bs rows, every row writing and reading the scratch KV block."""
    return (torch.zeros(bs, dtype=torch.int64), torch.zeros(bs, dtype=torch.int64),
            torch.full((bs,), scratch_block * block_size, dtype=torch.int64), torch.ones(bs, dtype=torch.int32),
            torch.full((bs, MIN_WIDTH + 1), scratch_block, dtype=torch.int32))


def export_step(model: nn.Module, slots, inputs: tuple, many: bool):
    """torch.export of the step: block-table width and KV pool block count dynamic, the batch too with many."""
    from torch.export import Dim, export

    width, blocks = Dim("width", min=MIN_WIDTH), Dim("blocks", min=2)
    row = {0: Dim("batch", min=2)} if many else {}
    row_dims = (row or None,) * 4 + ({**row, 1: width},)
    tensor_dims = tuple({0: blocks} if name in KV_POOLS else None for _, name in slots)
    program = export(ExportableStep(model, slots), (*inputs, *(getattr(m, n) for m, n in slots)),
                     dynamic_shapes=(*row_dims, tensor_dims), strict=False)
    lifted = [*program.state_dict, *program.constants]
    if lifted:  # a tensor held outside a module attribute would be baked into the library
        raise RuntimeError(f"the exported step would embed tensors: {lifted[:3]}")
    return program


def build_library(program, path: Path) -> None:
    """AOTInductor-compile an exported step; its shared library lands at path (atomically: a concurrent or
    interrupted build leaves no half-written file where a later run looks)."""
    from torch._inductor import aoti_compile_and_package

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=".build-"))
    try:
        package = aoti_compile_and_package(program, package_path=str(scratch / "step.pt2"))
        with zipfile.ZipFile(package) as archive:
            [library] = [n for n in archive.namelist() if n.endswith(".so")]
            (scratch / "step.so").write_bytes(archive.read(library))
        os.replace(scratch / "step.so", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    prune_libraries(path.parent)


def prune_libraries(folder: Path, keep_days: float = STALE_DAYS) -> None:
    """Remove libraries no engine has loaded for keep_days (a library's mtime is set on every load): every
    upgrade of torch or lmconvert, and every model tried, leaves one (~5 MB for SmolLM2) behind."""
    cutoff = time.time() - keep_days * 86400
    for library in folder.glob("*.so"):
        with contextlib.suppress(OSError):  # another process pruned it first
            if library.stat().st_mtime < cutoff:
                library.unlink()


@functools.cache
def cpu_features() -> str:
    """The instruction sets a library may use: inductor compiles for the host's (AVX512-BF16, AMX, ... beyond
    torch's capability level), so a cache shared between machines (an NFS home) keeps one library per CPU kind."""
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {' '.join(sorted(flags.split()[2:]))}"


def library_key(model: nn.Module, slots, many: bool, threads: int) -> str:
    """What the compiled step depends on: torch, the CPU's instruction sets, threads (inductor bakes the OpenMP
    team size), the model's config and tensors (names, dtypes, shapes but the pools' block count, strides) and
    the sources of the modules and kernels the step runs."""
    digest = hashlib.sha256(repr((torch.__version__, cpu_features(), sources_digest(), threads, many,
                                  getattr(model, "config", None))).encode())
    for module, name in slots:
        tensor = getattr(module, name)
        shape = [-1, *tensor.shape[1:]] if name in KV_POOLS else list(tensor.shape)
        digest.update(f"{type(module).__name__}.{name} {tensor.dtype} {shape} {tensor.stride()}\n".encode())
    return digest.hexdigest()[:32]


@functools.cache
def sources_digest() -> str:
    """Of the runtime's and kernels' sources, once a process (every engine's two keys take it)."""
    import lmconvert.kernels
    import lmconvert.runtime

    digest = hashlib.sha256()
    for package in (lmconvert.runtime, lmconvert.kernels):
        for source in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()


class CompiledDecode:
    def __init__(self, model, max_batch_size: int, max_blocks: int, scratch_block: int, block_size: int):
        """scratch_block: a KV block no sequence owns, written by the compiling warm-up steps. The model's
        tensors never change after load: the steps take the ones it holds now."""
        os.environ.setdefault(CACHE_ENV, str(default_cache_dir()))  # read when inductor first compiles
        self.model = model
        self.max_batch_size, self.max_blocks = max_batch_size, max(max_blocks, MIN_WIDTH)
        self.scratch_block, self.block_size = scratch_block, block_size
        self.threads = torch.get_num_threads()
        self.slots = model_tensors(model)
        self.tensors = [getattr(m, name) for m, name in self.slots]
        self.ready: set[bool] = set()  # compiled so far: False = the batch-1 graph, True = the larger batches'
        self.backend: dict[bool, str] = {}  # "aot" (cached library) or "torch.compile" (the fallback)
        self.error: BaseException | None = None
        self._runners: dict = {}  # many -> AOTIModelContainerRunnerCpu
        self._libraries: dict[bool, Path] = {}
        self._step = None  # torch.compile's, made on the compile thread (importing the compiler takes ~2 s)
        self._threads: dict[bool, threading.Thread] = {}
        self._compiling = threading.Lock()  # one compile at a time
        self.eager_steps = 0
        threading._register_atexit(self._finish_at_exit)
        _LIVE.add(self)
        for many in (False, True):  # cached: compiled from the first step
            if self.library(many).exists():
                self._load(many)

    def library(self, many: bool) -> Path:
        if many not in self._libraries:
            key = library_key(self.model, self.slots, many, self.threads)
            self._libraries[many] = cache_root() / "aot" / f"{key}.so"
        return self._libraries[many]

    def _load(self, many: bool) -> bool:
        """Load a cached library and check it on the scratch block; a broken one is removed (rebuilt later)."""
        path = self.library(many)
        try:
            self._runners[many] = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
            with contextlib.suppress(OSError):  # a read-only cache is still used
                os.utime(path)  # in use: prune_libraries keeps it
            with torch.inference_mode():
                logits = self._run_library(many, *example_inputs(2 if many else 1, self.scratch_block,
                                                                   self.block_size))
            if not torch.isfinite(logits).all():
                raise RuntimeError("non-finite logits on the warm-up step")
        except Exception as e:  # noqa: BLE001  a damaged cache file must not stop the engine
            self._runners.pop(many, None)
            log.warning("cached CPU decode step %s unusable (%s): removed, compiling again", path, e)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return False
        self.backend[many] = "aot"
        self.ready.add(many)
        return True

    def _start(self, many: bool) -> None:
        if many not in self._threads:
            self._threads[many] = threading.Thread(target=self._compile, args=(many,), daemon=True,
                                                   name=f"lmconvert-compile-{'batch' if many else 'single'}")
            self._threads[many].start()

    def _finish_at_exit(self) -> None:
        """Python 3.11 ends daemon threads at exit with pthread_exit, which aborts one inside C++ (torch's
        compiler): let a running compile finish instead (its result is cached, so it is paid once). Registered
        with threading's exit hooks, which run last-registered first: before concurrent.futures stops the
        executors the compiler submits to (an atexit hook would run after)."""
        running = [t for t in self._threads.values() if t.is_alive()]
        if running:
            print(f"lmconvert: finishing the CPU decode step's compile (once; cached in {cache_root()})",
                  file=sys.stderr, flush=True)
        for t in running:
            t.join()

    def wait(self, batches: bool = False) -> None:
        """Block until the batch-1 graph (and with batches, the larger batches' graph) is compiled."""
        for many in (False, True) if batches else (False,):
            if many not in self.ready:
                self._start(many)
                self._threads[many].join()
        if self.error is not None:
            raise self.error

    def _compile(self, many: bool) -> None:
        inputs = example_inputs(2 if many else 1, self.scratch_block, self.block_size)
        try:
            with self._compiling, torch.inference_mode():
                torch.set_num_threads(self.threads)  # a new thread's OpenMP team size is its own
                try:
                    program = export_step(self.model, self.slots, inputs, many)
                except Exception as e:  # noqa: BLE001  not exportable whole: torch.compile breaks the graph
                    log.info("the CPU decode step does not export whole (%s); compiling with torch.compile",
                             str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                    self._torch_compile()
                    self._run_compiled(*inputs)
                    self.backend[many] = "torch.compile"
                else:
                    build_library(program, self.library(many))
                    if not self._load(many):
                        raise RuntimeError("the compiled decode step failed its warm-up")
            self.ready.add(many)
        except Exception as e:  # stay eager: slower, still right
            self.error = e
            log.warning("compiling the CPU decode step failed (%s); decoding eagerly", e)

    def _torch_compile(self) -> None:
        if self._step is None:
            for layer in self.model.layers:  # the KV pools' size follows --session-len / --num-cache-tokens
                for name in KV_POOLS:
                    pool = getattr(layer.self_attn, name, None)
                    if pool is not None:
                        torch._dynamo.mark_dynamic(pool, 0)
            # the model's modules never change after load: guarding their ~1,000 attributes would cost ~1 ms a
            # step. cpp_wrapper: the step calls its kernels from C++, not Python
            self._step = torch.compile(self._forward, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True})

    def _forward(self, input_ids, positions):
        return self.model.compute_logits(self.model(input_ids, positions))

    def fits(self, bs: int, width: int) -> bool:
        """Whether this step can take the compiled path now (else it runs eagerly, and its graph gets compiled)."""
        if bs > self.max_batch_size or width > self.max_blocks:
            return False
        if (bs > 1) not in self.ready:
            self.eager_steps += 1
            if self.eager_steps > COMPILE_AFTER_STEPS:
                self._start(bs > 1)
            return False
        return True

    def run(self, input_ids, positions, slot_mapping, context_lens, block_tables) -> torch.Tensor:
        bs = input_ids.shape[0]
        if block_tables.shape[1] < MIN_WIDTH:
            block_tables = torch.cat([block_tables, block_tables.new_zeros(bs, MIN_WIDTH - block_tables.shape[1])], 1)
        if (bs > 1) in self._runners:
            return self._run_library(bs > 1, input_ids, positions, slot_mapping, context_lens, block_tables)
        return self._run_compiled(input_ids, positions, slot_mapping, context_lens, block_tables)

    def _run_library(self, many: bool, *inputs) -> torch.Tensor:
        # the library reads its inputs as exported: contiguous, these dtypes (it checks neither)
        dtypes = (torch.int64, torch.int64, torch.int64, torch.int32, torch.int32)
        inputs = [t.to(dtype).contiguous() for t, dtype in zip(inputs, dtypes)]
        return self._runners[many].run(inputs + self.tensors)[0]

    def _run_compiled(self, input_ids, positions, slot_mapping, context_lens, block_tables) -> torch.Tensor:
        torch._dynamo.mark_dynamic(block_tables, 1)  # the context grows: one graph for every length
        if input_ids.shape[0] > 1:
            for t in (input_ids, positions, slot_mapping, context_lens, block_tables):
                torch._dynamo.mark_dynamic(t, 0)  # one graph for every batch above 1
        with use_context(decode_context(slot_mapping, context_lens, block_tables)):
            return self._step(input_ids, positions)
