"""Tensor-parallel model runner: rank 0 schedules and samples, the other ranks only run the model.

Each step rank 0 broadcasts the flattened batch (as nano-vllm does) as two int64 tensors: a fixed header
(command and sizes), then one payload (ids, positions, slots, cu_seqlens, context lens, block tables, logit
rows). On GPUs they go over a gloo (CPU) group beside the NCCL one: a worker then learns the next step while
its GPU still runs this one, and never waits for its GPU (receiving them over NCCL did: each step began
with the worker's host reading the header back from its GPU, 0.2-0.4 ms in which both GPUs sat idle). A
lookahead step's token ids exist only on rank 0's GPU: they follow over NCCL, in stream order. Every rank
builds its step tensors from the same data, so all take the same path (CUDA graph or eager) and meet at
the same collectives.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import traceback
import weakref

import torch
import torch.distributed as dist

from lmconvert.errors import UserError, debug_enabled, one_line
from lmconvert.runtime.context import Context, query_hints
from lmconvert.runtime.dist import Launch, close_group, init_group, rank_device, spawn_workers, torchrun_ranks
from lmconvert.runtime.model_runner import ModelRunner
from lmconvert.runtime.tp import ShardedSource, apply_tp, peer_buffers, shard_config

EXIT, STEP, DENSE = 0, 1, 2
HEADER = 9  # [command, payload length, T, B, block-table width, logit rows, max query len, ids on the GPU,
#              leading decode rows]


class TPRunner(ModelRunner):
    def __init__(self, source, runner_args: tuple, rank: int, world: int, launch: Launch | None = None):
        self.rank, self.world, self.workers = rank, world, launch
        super().__init__(ShardedSource(source, rank, world), *runner_args)
        # step descriptions travel on the host (see the module docstring); on CPU the default group is gloo
        self.host_group = dist.new_group(backend="gloo") if self.device.type == "cuda" else None
        # workers must hear EXIT even when the engine is dropped unclosed: on collection or at exit
        self._finalizer = weakref.finalize(self, _shutdown, self.device, self.host_group, launch) if rank == 0 else None

    def _load_model(self, source: ShardedSource):
        model = super()._load_model(source)
        self.peer_buffers = peer_buffers(self.device, source.config.hidden_size)
        apply_tp(model, self.world, source.full_config.vocab_size, bufs=self.peer_buffers)
        return model

    def _count_blocks(self, num_cache_tokens, fraction) -> int:
        n = torch.tensor([super()._count_blocks(num_cache_tokens, fraction)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # free memory differs per GPU; block ids must mean the same
        return int(n.item())

    # ---- rank 0 ----------------------------------------------------------------------------------
    def launch(self, batch, input_ids=None):
        with worker_failures(self.workers):
            return super().launch(batch, input_ids)

    def teacher_forced(self, batch):
        with worker_failures(self.workers):
            return super().teacher_forced(batch)

    def _prepare(self, batch, all_rows: bool = False, input_ids: torch.Tensor | None = None):
        ids, positions, slots, cu, ctx_lens, tables, logit_rows = self._flatten(batch, all_rows, input_ids is not None)
        payload = ids + positions + slots + cu + ctx_lens + [b for row in tables for b in row] + logit_rows
        hints = query_hints(cu)
        header = [STEP, len(payload), len(ids), len(ctx_lens), len(tables[0]), len(logit_rows),
                  hints["max_query_len"], int(input_ids is not None), hints["decode_rows"]]
        data = self._send(header, payload).to(self.device, non_blocking=True)
        if input_ids is not None:
            dist.broadcast(input_ids, 0)
            data[:len(input_ids)] = input_ids
        return self._unpack(header, data, logit_rows)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        with worker_failures(self.workers):
            return self.dense_logits(self._send([DENSE, len(token_ids)], token_ids).to(self.device))

    def _send(self, header: list[int], payload: list[int]) -> torch.Tensor:
        """Broadcasts header and payload over the host group; returns the payload (a CPU tensor)."""
        dist.broadcast(torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.int64), 0, group=self.host_group)
        data = torch.tensor(payload, dtype=torch.int64)
        dist.broadcast(data, 0, group=self.host_group)
        return data

    def close(self) -> None:
        if self._finalizer is not None:
            self.graphs = None  # graphs with captured collectives keep the NCCL communicator busy (see close_group)
            gc.collect()
            self._finalizer()  # runs once

    # ---- every rank ------------------------------------------------------------------------------
    def _unpack(self, header: list[int], data: torch.Tensor, logit_rows: list[int]):
        _, _, T, B, W, L, max_q, _, decode_rows = header[:9]
        ids, positions, slots, cu, ctx_lens, tables, _ = data.split([T, T, T, B + 1, B, B * W, L])
        ctx = Context(cu_seqlens_q=cu.int(), slot_mapping=slots, block_tables=tables.view(B, W).int(),
                      context_lens=ctx_lens.int(), max_query_len=max_q, is_decode=T == B, decode_rows=decode_rows)
        return ids, positions, ctx, logit_rows

    # ---- ranks 1.. -------------------------------------------------------------------------------
    @torch.inference_mode()
    def serve(self) -> None:
        """Runs what rank 0 broadcasts until it says EXIT. Nothing here waits for this rank's GPU."""
        header = torch.empty(HEADER, dtype=torch.int64)
        while True:
            dist.broadcast(header, 0, group=self.host_group)
            h = header.tolist()
            if h[0] == EXIT:
                return
            host = torch.empty(h[1], dtype=torch.int64)
            dist.broadcast(host, 0, group=self.host_group)
            data = host.to(self.device, non_blocking=True)
            if h[0] == DENSE:
                self.dense_logits(data)
                continue
            if h[7]:  # a lookahead step: its token ids come from rank 0's GPU
                ids = torch.empty(h[2], dtype=torch.int64, device=self.device)
                dist.broadcast(ids, 0)
                data[:h[2]] = ids
            self.execute(*self._unpack(h, data, host[h[1] - h[5]:].tolist()))


def _shutdown(device: torch.device, host_group, launch: Launch | None) -> None:
    dist.broadcast(torch.tensor([EXIT] + [0] * (HEADER - 1)), 0, group=host_group)
    close_group(device)
    if launch is not None:
        for p in launch.processes:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(launch.store_dir, ignore_errors=True)


def open_source(spec):
    """A worker's model source: (path, arch, model_source) is opened again; an object came pickled."""
    if isinstance(spec, tuple):
        from lmconvert.engine import open_model

        path, arch, model_source = spec
        return open_model(path, arch=arch, model_source=model_source)
    return spec


def _worker_main(rank: int, world: int, store_dir: str, spec, runner_args: tuple) -> None:
    launch = Launch(store_dir)
    try:
        device = rank_device(runner_args[0], rank, world)
        if device.type == "cpu":  # ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        init_group(device, rank, world, launch.init_method)
        TPRunner(open_source(spec), (device, *runner_args[1:]), rank, world).serve()
        close_group(device)
    except BaseException as e:
        if debug_enabled():
            traceback.print_exc()
            sys.stderr.flush()
        with open(launch.error_path(rank), "w") as f:  # rank 0 reports it, as one line (worker_failures)
            f.write(one_line(e))
        os._exit(1)  # the peers' collectives then fail instead of waiting


@contextlib.contextmanager
def worker_failures(launch: Launch | None):
    """Rank 0's collectives fail when a spawned worker died: report the worker's own error instead."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        failure = None
        if launch is not None:
            for p in launch.processes:
                p.join(timeout=2)  # a failing worker writes its error, then exits: its peers' sockets close
            failure = launch.worker_error()
        if failure is None:
            raise
        raise UserError(failure) from e


def start_tp(tp: int, source, spec, runner_args: tuple) -> TPRunner:
    """Rank 0's runner, its workers started (spawn) or joined (torchrun). Never returns on torchrun's ranks > 0."""
    device = runner_args[0]
    ranks = torchrun_ranks()
    if ranks is not None:
        rank, world, local_rank = ranks
        if world != tp:
            raise UserError(f"--tp {tp} but WORLD_SIZE is {world}")
        device = rank_device(device, local_rank, world)
        init_group(device, rank, world)
        runner = TPRunner(source, (device, *runner_args[1:]), rank, world)
        if rank == 0:
            return runner
        runner.serve()
        close_group(device)
        sys.exit(0)
    shard_config(source.config, tp)  # fails before spawning when --tp does not divide the model
    device = rank_device(device, 0, tp)  # ... or when the GPUs are missing
    launch = spawn_workers(tp, _worker_main, (spec, runner_args))
    with worker_failures(launch):
        init_group(device, 0, tp, launch.init_method)
        return TPRunner(source, (device, *runner_args[1:]), 0, tp, launch)
