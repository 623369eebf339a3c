"""The CPU's decode fast path, beside cuda_graphs.py: the decode step compiled by torch.compile (inductor).

Eager, a decode step of a small model is ~20 Python-dispatched ops a layer, each costing more than its math
(SmolLM2: ~600 ops a token). Inductor turns the step into generated C++/OpenMP loops, elementwise chains
fused, around the matmuls (oneDNN, ATen's packed int4 / int8). Its artifacts are cached on disk
(TORCHINDUCTOR_CACHE_DIR, default ~/.cache/lmconvert/inductor): the first run on a machine compiles for a
minute or so on two cores, later starts only trace (seconds).

Compiling happens on a thread of its own, on a scratch KV block, while steps run eagerly: no answer waits for
it, and once a batch shape is compiled its decode steps switch over. A graph starts compiling once the engine
has decoded COMPILE_AFTER_STEPS steps eagerly (a one-question chat never compiles, and its first answer does
not share the cores with the compiler); the batch-1 and larger-batch graphs separately (a chat never needs
the second).

Shapes: the block-table width is dynamic (one graph whatever the context length; padded to at least 2
columns, as a dimension of 1 would get a graph of its own); batch 1 has its graph, larger batches share one
with a dynamic batch dim. Attention runs kernels.paged_attention's tensor-only decode path (no host reads).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours: see _finish_at_exit)
import logging
import os
import sys
import threading
import weakref
from pathlib import Path

import torch

from lmconvert.runtime.context import Context, use_context

log = logging.getLogger(__name__)
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
MIN_WIDTH = 2
# Decode steps run eagerly before a graph starts compiling: a short exchange (a one-question chat, a first short
# answer) is not slowed by the compile competing for the cores, and never waits for it at exit.
COMPILE_AFTER_STEPS = 32


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every CompiledDecode, for compiling()


def compiling() -> bool:
    """A compile is running on some engine's background thread (a process leaving now would wait for it)."""
    return any(t.is_alive() for compiled in list(_LIVE) for t in compiled._threads.values())


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmconvert" / "inductor"


class CompiledDecode:
    def __init__(self, model, max_batch_size: int, max_blocks: int, scratch_block: int, block_size: int):
        """scratch_block: a KV block no sequence owns, written by the compiling warm-up steps."""
        os.environ.setdefault(CACHE_ENV, str(default_cache_dir()))  # read when inductor first compiles
        self.model = model
        self.max_batch_size, self.max_blocks = max_batch_size, max(max_blocks, MIN_WIDTH)
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.ready: set[bool] = set()  # compiled so far: False = the batch-1 graph, True = the larger batches'
        self.error: BaseException | None = None
        self._step = None  # made on the compile thread: importing torch's compiler takes ~2 s
        self._threads: dict[bool, threading.Thread] = {}
        self._compiling = threading.Lock()  # one compile at a time
        self.eager_steps = 0
        threading._register_atexit(self._finish_at_exit)
        _LIVE.add(self)

    def _start(self, many: bool) -> None:
        if many not in self._threads:
            self._threads[many] = threading.Thread(target=self._warm_up, args=(2 if many else 1,), daemon=True,
                                                   name=f"lmconvert-compile-{'batch' if many else 'single'}")
            self._threads[many].start()

    def _finish_at_exit(self) -> None:
        """Python 3.11 ends daemon threads at exit with pthread_exit, which aborts one inside C++ (torch's
        compiler): let a running compile finish instead (its result is cached, so it is paid once). Registered
        with threading's exit hooks, which run last-registered first: before concurrent.futures stops the
        executors the compiler submits to (an atexit hook would run after)."""
        running = [t for t in self._threads.values() if t.is_alive()]
        if running:
            print("lmconvert: finishing the CPU decode step's compile (once; cached in "
                  f"{os.environ[CACHE_ENV]})", file=sys.stderr, flush=True)
        for t in running:
            t.join()

    def wait(self, batches: bool = False) -> None:
        """Block until the batch-1 graph (and with batches, the larger batches' graph) is compiled."""
        for many in (False, True) if batches else (False,):
            self._start(many)
            self._threads[many].join()
        if self.error is not None:
            raise self.error

    def _compiled_step(self):
        if self._step is None:
            for layer in self.model.layers:  # the KV pools' size follows --session-len / --num-cache-tokens
                for pool in (layer.self_attn.k_cache, layer.self_attn.v_cache, layer.self_attn.k_scales,
                             layer.self_attn.v_scales):
                    if pool is not None:
                        torch._dynamo.mark_dynamic(pool, 0)
            # the model's modules never change after load: guarding their ~1,000 attributes would cost ~1 ms a
            # step. cpp_wrapper: the step calls its ~500 kernels from C++, not Python (SmolLM2 W4: +13% tok/s,
            # for a longer first compile)
            self._step = torch.compile(self._forward, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True})
        return self._step

    def _warm_up(self, bs: int) -> None:
        slots = torch.full((bs,), self.scratch_slot, dtype=torch.int64)
        tables = torch.full((bs, MIN_WIDTH), self.scratch_block, dtype=torch.int32)
        try:
            with self._compiling, torch.inference_mode():
                self._compiled_step()
                self.run(torch.zeros(bs, dtype=torch.int64), torch.zeros(bs, dtype=torch.int64), slots,
                         torch.ones(bs, dtype=torch.int32), tables)
            self.ready.add(bs > 1)
        except Exception as e:  # stay eager: slower, still right
            self.error = e
            log.warning("compiling the CPU decode step failed (%s); decoding eagerly", e)

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
        torch._dynamo.mark_dynamic(block_tables, 1)  # the context grows: one graph for every length
        if bs > 1:
            for t in (input_ids, positions, slot_mapping, context_lens, block_tables):
                torch._dynamo.mark_dynamic(t, 0)  # one graph for every batch above 1
        ctx = Context(cu_seqlens_q=torch.arange(bs + 1, dtype=torch.int32), slot_mapping=slot_mapping,
                      block_tables=block_tables, context_lens=context_lens, max_query_len=1, is_decode=True,
                      decode_rows=bs)
        with use_context(ctx):
            return self._step(input_ids, positions)
