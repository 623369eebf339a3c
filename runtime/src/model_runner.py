"""Turns a scheduled step into tensors, runs the model, samples. Owns the model and its KV cache."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from lmconvert.config import ModelConfig
from lmconvert.runtime.context import Context, dense_context, query_hints, use_context
from lmconvert.runtime.compiled_decode import CompiledDecode
from lmconvert.runtime.cuda_graphs import DecodeGraphs
from lmconvert.runtime.model import Transformer
from lmconvert.runtime.sampling import NON_FINITE, Sampler, StepLogprobs, TokenLogprob
from lmconvert.runtime.sequence import Sequence


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, kv_int8: bool = False) -> int:
    """K and V of one token over all layers; int8 KV adds an fp16 (scale, zero) pair per KV head."""
    if kv_int8:
        return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 2 * 2)
    return 2 * cfg.num_layers * cfg.kv_size * torch.finfo(dtype).bits // 8


def kv_pool(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed pool. On CPU, anonymous mmap pages: zero without a memset and resident only once written, so a
    short chat holds the blocks it uses, not the whole cache (masked attention still reads whole blocks, hence
    zeros rather than torch.empty's garbage, where 0 x NaN would leak in)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: a fork copies on write
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the map alive


def attach_kv_cache(attn, num_blocks: int, block_size: int, dtype: torch.dtype, kv_int8: bool, device) -> None:
    """K/V pools [num_blocks, block_size, KVH, D] in dtype, or int8 with fp16 (scale, zero) pools
    [num_blocks, block_size, KVH, 2] (layout: kernels/src/kv_cache.py)."""
    shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
    cache_dtype = torch.int8 if kv_int8 else dtype
    attn.k_cache = kv_pool(shape, cache_dtype, device)
    attn.v_cache = kv_pool(shape, cache_dtype, device)
    if kv_int8:
        attn.k_scales = kv_pool((*shape[:3], 2), torch.float16, device)
        attn.v_scales = kv_pool((*shape[:3], 2), torch.float16, device)


@dataclass(slots=True)
class Sampled:
    """A step's sampled token ids: on the device (where a lookahead step reads them as its input) and in
    pinned host memory once `done` has fired, so reading them waits for this step only, not later ones.
    On the host a row whose logits held NaN reads NON_FINITE (the device keeps a valid id for the lookahead).
    Their log-probabilities (when a sequence asked) come to the host the same way."""
    device: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None = None
    logprobs: StepLogprobs | None = None  # host copies

    @classmethod
    def of(cls, tokens: torch.Tensor, logprobs: StepLogprobs | None = None,
           broken: torch.Tensor | None = None) -> Sampled:
        flagged = tokens if broken is None else torch.where(broken, NON_FINITE, tokens)
        if tokens.device.type != "cuda":
            return cls(tokens, flagged, None, logprobs)
        host = _to_pinned(flagged)
        if logprobs is not None:
            logprobs = StepLogprobs(*map(_to_pinned, (logprobs.chosen, logprobs.top_values, logprobs.top_ids)),
                                    logprobs.ks)
        done = torch.cuda.Event()
        done.record()
        return cls(tokens, host, done, logprobs)

    def tolist(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()

    def logprob_rows(self) -> list[TokenLogprob | None]:
        """Each row's TokenLogprob (None where its sequence asked for none); call after tolist()."""
        if self.logprobs is None:
            return [None] * len(self.host)
        return self.logprobs.rows(self.host.tolist())


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class ModelRunner:
    def __init__(self, source, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_cache_tokens: int | None, cache_max_entry_count: float, max_batch_size: int = 128,
                 max_num_batched_tokens: int = 2048, session_len: int = 4096, use_cuda_graphs: bool = True,
                 kv_int8: bool = False, compile_decode: bool = False):
        """use_cuda_graphs: replay the decode step from CUDA graphs (GPU); compile_decode: torch.compile it, on a
        background thread (CPU)."""
        self.cfg: ModelConfig = source.config
        self.device, self.dtype, self.block_size, self.kv_int8 = device, dtype, block_size, kv_int8
        self.model = self._load_model(source)
        if device.type == "cuda":
            self._warm_up(min(max_num_batched_tokens, session_len))
        self.num_blocks = self._count_blocks(num_cache_tokens, cache_max_entry_count)
        compile_decode = compile_decode and device.type == "cpu"
        for layer in self.model.layers:  # the compiled CPU step's warm-up writes one scratch block past the rest
            attach_kv_cache(layer.self_attn, self.num_blocks + compile_decode, block_size, dtype, kv_int8, device)
        self.sampler = Sampler()
        self.graphs = None  # the decode fast path: CUDA graphs or the compiled CPU step, same interface
        max_blocks = -(-session_len // block_size)
        if device.type == "cuda" and use_cuda_graphs:
            self.graphs = DecodeGraphs(self.model, max_batch_size, max_blocks, device)
        elif compile_decode:
            self.graphs = CompiledDecode(self.model, max_batch_size, max_blocks, self.num_blocks, block_size)

    def reserve_kv_cache(self) -> None:
        """Every KV page resident now (CPU pools otherwise fill as blocks are first written): a server should
        meet its memory limit when it starts, not in the middle of a burst. Writes each value back unchanged
        (x * 1): blocks the prefix cache still holds keep their K/V."""
        for layer in self.model.layers:
            attn = layer.self_attn
            for pool in (attn.k_cache, attn.v_cache, getattr(attn, "k_scales", None), getattr(attn, "v_scales", None)):
                if pool is not None:
                    pool.mul_(1)

    def _load_model(self, source) -> Transformer:
        model = Transformer(self.cfg)
        model.load_weights(source, self.device, self.dtype)
        return model

    def close(self) -> None:  # the tensor-parallel runner stops its workers here
        pass

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int) -> None:
        """One full-budget prefill before sizing the KV cache: its activation peak and kernel tuning are then paid."""
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        with use_context(dense_context([num_tokens], self.device)):
            self.model.compute_logits(self.model(ids, torch.arange(num_tokens, device=self.device))[-1:])
        torch.cuda.synchronize()

    def _count_blocks(self, num_cache_tokens: int | None, fraction: float) -> int:
        if num_cache_tokens is None:
            if self.device.type != "cuda":
                raise ValueError("num_cache_tokens is required off the GPU")
            free, _ = torch.cuda.mem_get_info(self.device)
            num_cache_tokens = int(free * fraction) // kv_bytes_per_token(self.cfg, self.dtype, self.kv_int8)
        return max(1, num_cache_tokens // self.block_size)

    def _prepare(self, batch: list[tuple[Sequence, int]], all_rows: bool = False, input_ids: torch.Tensor | None = None):
        return self._tensors(*self._flatten(batch, all_rows, lookahead=input_ids is not None), input_ids=input_ids)

    def _flatten(self, batch: list[tuple[Sequence, int]], all_rows: bool = False, lookahead: bool = False):
        """The step as host lists: token ids, positions, slots, cu_seqlens, context lens, block tables, logit rows
        (each sequence's last token once its known tokens are all in; every token with all_rows).
        lookahead: each sequence's one token is the one the step before samples (not on the host yet), at
        position num_tokens; its id is a placeholder here."""
        bs = self.block_size
        ids, positions, slots, cu, ctx_lens, logit_rows = [], [], [], [0], [], []
        for seq, n in batch:
            start = seq.num_tokens if lookahead else seq.num_computed
            ids += [0] * n if lookahead else seq.token_ids(start, start + n)
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            cu.append(cu[-1] + n)
            ctx_lens.append(start + n)
            if all_rows:
                logit_rows += range(cu[-2], cu[-1])
            elif lookahead or seq.completes(n):  # the last known token is in this step: sample after it
                logit_rows.append(cu[-1] - 1)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]
        return ids, positions, slots, cu, ctx_lens, tables, logit_rows

    def _tensors(self, ids, positions, slots, cu, ctx_lens, tables, logit_rows, input_ids=None):
        def dev(x, dtype):
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        ctx = Context(cu_seqlens_q=dev(cu, torch.int32), slot_mapping=dev(slots, torch.int64),
                      block_tables=dev(tables, torch.int32), context_lens=dev(ctx_lens, torch.int32),
                      is_decode=len(ids) == len(ctx_lens), **query_hints(cu))
        ids = input_ids if input_ids is not None else dev(ids, torch.int64)
        return ids, dev(positions, torch.int64), ctx, logit_rows

    @torch.inference_mode()
    def launch(self, batch: list[tuple[Sequence, int]], input_ids: torch.Tensor | None = None) -> Sampled | None:
        """Enqueues the step and its sampling without waiting for them (on a GPU). input_ids (device, one per
        sequence) makes it a lookahead step: each sequence's next token is what the previous step samples,
        which need not have reached the host (engine.LLMEngine overlaps its host work with the GPU so)."""
        logits = self.execute(*self._prepare(batch, input_ids=input_ids))
        if logits is None:
            return None
        sampling_seqs = [seq for seq, n in batch if input_ids is not None or seq.completes(n)]
        return Sampled.of(*self.sampler(logits, sampling_seqs))

    def execute(self, input_ids, positions, ctx: Context, logit_rows: list[int]) -> torch.Tensor | None:
        """The model part of a step (tensor-parallel workers run only this): logits of logit_rows, or None."""
        if ctx.is_decode and self.graphs is not None and self.graphs.fits(len(input_ids), ctx.block_tables.shape[1]):
            logits = self.graphs.run(input_ids, positions, ctx.slot_mapping, ctx.context_lens, ctx.block_tables)
            # a one-token prefill chunk that is not the prompt's last looks like a decode but samples nothing
            return logits if len(logit_rows) == len(input_ids) else (logits[logit_rows] if logit_rows else None)
        with use_context(ctx):
            hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden[logit_rows]) if logit_rows else None

    @torch.inference_mode()
    def teacher_forced(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Stores the step's K/V like run() and returns fp32 logits of every token in it (scoring), sampling nothing.
        A copy: a decode step's logits live in the CUDA graph's output buffer, which the next replay overwrites."""
        logits = self.execute(*self._prepare(batch, all_rows=True))
        return None if logits is None else logits.clone()

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, vocab] of one whole sequence, computed without the KV cache (eval, tests)."""
        return self.dense_logits(torch.tensor(token_ids, device=self.device))

    def dense_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with use_context(dense_context([len(ids)], self.device)):
            hidden = self.model(ids, torch.arange(len(ids), device=self.device))
        return self.model.compute_logits(hidden)
