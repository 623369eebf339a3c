"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step gets a token budget. Running sequences go first (a decode costs one token, an unfinished
prefill its next chunk), then waiting ones in arrival order. When the block pool runs dry the newest
running sequence is preempted: its blocks are freed and it is recomputed later (vLLM's recompute mode).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lmconvert.runtime.block_manager import BlockManager
from lmconvert.runtime.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_batch_size: int = 128
    max_num_batched_tokens: int = 2048
    session_len: int = 4096


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager):
        self.cfg = cfg
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns (sequence, number of new tokens to compute) pairs for one step."""
        budget = self.cfg.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0 or len(batch) == self.cfg.max_batch_size:
                break
            while not self.blocks.ensure_slots(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(batch) < self.cfg.max_batch_size:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.ensure_slots(seq, seq.num_computed + n):
                self.blocks.free_seq(seq)  # a waiting sequence holds no blocks (it re-matches its prefix later)
                if not self.running and not batch:  # cannot fit even alone: fail it rather than spin
                    raise RuntimeError("KV cache too small for one request: raise the cache size or lower session_len")
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
