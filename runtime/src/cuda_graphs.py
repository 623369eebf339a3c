"""CUDA graphs of the decode step, one per batch-size bucket, replayed with inputs copied into static buffers.

A decode step of a small model is hundreds of short kernel launches; replaying a captured graph removes
their launch gaps. Rows beyond the real batch are padding: slot -1 (nothing stored), context length 1.
"""

from __future__ import annotations

import torch

from lmconvert.runtime.context import Context, use_context


def batch_buckets(max_batch_size: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


class DecodeGraphs:
    def __init__(self, model, max_batch_size: int, max_blocks: int, device: torch.device):
        self.model = model
        self.buckets = sorted(set(batch_buckets(max_batch_size)))
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _context(self, bs: int) -> Context:
        return Context(cu_seqlens_q=self.cu_seqlens[:bs + 1], slot_mapping=self.slot_mapping[:bs],
                       block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                       max_query_len=1, is_decode=True)

    def _step(self, bs: int) -> torch.Tensor:
        return self.model.compute_logits(self.model(self.input_ids[:bs], self.positions[:bs]))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs fit in its memory pool
            with use_context(self._context(bs)):
                self._step(bs)  # warm-up: autotuning and lazy initialisation stay out of the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self.logits[bs] = self._step(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, bs: int, width: int) -> bool:
        return bs <= self.buckets[-1] and width <= self.block_tables.shape[1]

    def run(self, input_ids, positions, slot_mapping, context_lens, block_tables) -> torch.Tensor:
        bs, width = input_ids.shape[0], block_tables.shape[1]
        bucket = next(b for b in self.buckets if b >= bs)
        self.input_ids[:bs] = input_ids
        self.positions[:bs] = positions
        self.slot_mapping[:bucket] = -1
        self.slot_mapping[:bs] = slot_mapping
        self.context_lens[:bucket] = 1
        self.context_lens[:bs] = context_lens
        self.block_tables[:bs, :width] = block_tables
        self.graphs[bucket].replay()
        return self.logits[bucket][:bs]
