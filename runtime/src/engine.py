"""LLMEngine: the one object chat, generate, bench and the server drive.

    engine = LLMEngine("./smol-engine")
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    for out in engine.stream("Hello", params): print(out.delta, end="")
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from lmconvert.config import parse_dtype
from lmconvert.devices import bound_onednn_cache, default_dtype, physical_cores, resolve_device
from lmconvert.errors import UserError
from lmconvert.runtime.block_manager import BlockManager
from lmconvert.runtime.detokenizer import IncrementalDetokenizer
from lmconvert.runtime.model_runner import ModelRunner, Sampled
from lmconvert.runtime.faults import FaultInjector
from lmconvert.runtime.sampling import NON_FINITE, SamplingParams, TokenLogprob
from lmconvert.runtime.scheduler import Scheduler, SchedulerConfig
from lmconvert.runtime.sequence import Sequence


@dataclass(slots=True)
class RequestOutput:
    request_id: int
    text: str  # everything generated so far (stop string excluded)
    delta: str  # what this step added
    token_ids: list[int]
    prompt_tokens: int
    finished: bool
    finish_reason: str | None  # stop, length, abort, or error (the model's logits held NaN)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when SamplingParams.logprobs asked


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    sent: int = 0  # characters of detok.text already handed out as deltas
    text_end: int | None = None  # where a matched stop string cut the text
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class _Step:
    """A launched step: what it computes, which of its sequences sample (decided at launch: a sequence may
    finish, and lose its counters, while the step is in flight) and the sampled tokens (None: no sampling)."""
    batch: list[tuple[Sequence, int]]
    samples: list[bool]
    sampled: Sampled | None


class LLMEngine:
    def __init__(self, model, *, device: str | None = None, dtype: str | None = None, session_len: int | None = None,
                 max_batch_size: int = 128, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 num_cache_tokens: int | None = None, cache_max_entry_count: float = 0.8,
                 enable_prefix_caching: bool = True, use_cuda_graphs: bool = True, arch: str = "auto",
                 model_source: str | None = None, tp: int = 1, kv_int8: bool = False, overlap: bool | None = None,
                 chat_template: str | None = None, compile_decode: bool = False, threads: int | None = None):
        """compile_decode (CPU): decode through the compiled step, loaded from its cache or built on a background
        thread (runtime/src/compiled_decode.py);
        threads (CPU): intra-op threads, default one per physical core."""
        from lmconvert.engine import open_model  # the engine package imports little; keep runtime importable alone

        self.device = resolve_device(device)  # before the model loads: a bad --device fails at once
        if self.device.type == "cpu":
            bound_onednn_cache()  # before loading: a quantized engine's CPU repacking may be the first oneDNN op
        source = open_model(model, arch=arch, model_source=model_source)
        self.config = source.config
        self.dtype = parse_dtype(dtype) if dtype else default_dtype(self.device, self.config.torch_dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(threads or physical_cores())
        self.tokenizer = source.load_tokenizer()
        if chat_template is not None:  # --chat-template: replaces the model's own
            self.tokenizer.chat_template = chat_template
        self.generation_config = gen = source.generation_config or {}
        eos = gen.get("eos_token_id", [])
        self.eos_ids = set(self.config.eos_token_ids) | set(eos if isinstance(eos, list) else [eos])
        self.session_len = session_len or min(self.config.max_position_embeddings, 8192)
        if num_cache_tokens is None and self.device.type != "cuda":
            num_cache_tokens = max(self.session_len, 4 * 1024)
        self.kv_int8 = kv_int8  # K/V stored as int8 with per-(token, head) scales: about twice the tokens
        runner_args = (self.device, self.dtype, block_size, num_cache_tokens, cache_max_entry_count,
                       max_batch_size, max_num_batched_tokens, self.session_len, use_cuda_graphs, kv_int8,
                       compile_decode and tp == 1)  # tensor-parallel ranks must take the same path every step
        if tp > 1:  # workers (spawned here, or torchrun's other ranks) rebuild the source themselves
            from lmconvert.runtime.tp_runner import start_tp

            spec = model if hasattr(model, "layer_tensors") else (model, arch, model_source)
            self.runner = start_tp(tp, source, spec, runner_args)
        else:
            self.runner = ModelRunner(source, *runner_args)
        # a sequence must always fit the cache alone, or preemption could never make room for it
        self.session_len = min(self.session_len, self.runner.num_blocks * block_size)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_batch_size, max(max_num_batched_tokens, block_size), self.session_len), self.block_manager)
        self.requests: dict[int, _Request] = {}
        # Overlap (GPU default): the next decode step is launched before this one's tokens reach the host, so
        # the host's per-step work (scheduling, detokenizing, stop checks) runs while the GPU computes.
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._in_flight: _Step | None = None
        self._token_texts: dict[int, str] = {}
        self._grammars, self._grammars_lock = None, threading.Lock()
        self.faults = FaultInjector.from_env()  # test-only: LMCONVERT_INJECT_FAULT

    # ---- requests --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("this model has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise UserError("empty prompt")
        if len(ids) >= self.session_len:
            raise UserError(f"prompt has {len(ids)} tokens; the session length is {self.session_len}")
        seq = Sequence(ids, params)
        if params.guided is not None:
            seq.matcher = self.grammars.matcher(params.guided)
        self.requests[seq.seq_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer))
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.seq.finished:
            self.scheduler.finish(req.seq, "abort")
            self.runner.sampler.release(req.seq.seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that produced a token."""
        current, self._in_flight = self._in_flight, None
        self.faults.before_step(self.runner.sampler)
        if current is None:
            batch = self.scheduler.schedule()
            if not batch:
                return []
            current = _Step(batch, [seq.completes(n) for seq, n in batch], self.runner.launch(batch))
        if self.overlap:
            self._in_flight = self._lookahead(current)
        return self._commit(current)

    def _lookahead(self, current: _Step) -> _Step | None:
        """Launch the decode step after `current` before its tokens are known: each sequence's input is the
        token `current` samples for it (read on the device). Only when every sequence samples in `current`,
        none waits for admission (the scheduler then decides the next step) and none needs its tokens on the
        host to sample (penalties). A sequence that `current` finishes (stop token) wastes its row; those
        that surely finish (length) are left out."""
        if current.sampled is None or self.scheduler.waiting or not all(current.samples):
            return None  # nothing sampled, admissions pending, or a prefill chunk with more to come
        seqs, rows = [], []
        for row, (seq, _) in enumerate(current.batch):
            p = seq.params
            if seq.finished or len(seq.output_ids) + 1 >= p.max_tokens or seq.num_tokens + 1 >= self.session_len:
                continue
            if p.penalized or seq.matcher is not None:  # the host must see this token before the next step
                return None
            if not self.block_manager.ensure_slots(seq, seq.num_tokens + 1):
                return None  # the pool is short: let the scheduler preempt
            seqs.append(seq)
            rows.append(row)
        if not seqs:
            return None
        ids = current.sampled.device
        if len(rows) < len(current.batch):
            ids = ids[torch.tensor(rows, device=ids.device)]
        batch = [(seq, 1) for seq in seqs]
        return _Step(batch, [True] * len(batch), self.runner.launch(batch, input_ids=ids))

    def _commit(self, step: _Step) -> list[RequestOutput]:
        """Book a launched step's results (waiting for its tokens); sequences that finished or were aborted
        while it was in flight are skipped."""
        tokens = iter(step.sampled.tolist() if step.sampled is not None else [])
        logprobs = iter(step.sampled.logprob_rows() if step.sampled is not None else [])
        outputs = []
        for (seq, n), samples in zip(step.batch, step.samples):
            token, logprob = (next(tokens), next(logprobs)) if samples else (None, None)
            if seq.finished:
                continue
            seq.num_computed += n
            self.block_manager.register_full_blocks(seq)
            if samples:
                outputs.append(self._append(self.requests[seq.seq_id], token, logprob))
        return outputs

    def _append(self, req: _Request, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        seq, p = req.seq, req.seq.params
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        reason = None
        if token == NON_FINITE:
            reason = "error"
        elif (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        else:
            seq.output_ids.append(token)
            req.detok.add(token)
            if seq.matcher is not None and (not seq.matcher.accept_token(token) or seq.matcher.is_terminated()):
                reason = "stop"  # the grammar is complete
            if logprob is not None:  # kept in step with output_ids (a stop token is in neither)
                logprob.text = self._token_text(token)
                logprob.top_texts = [self._token_text(t) for t, _ in logprob.top]
                req.logprobs.append(logprob)
            reason = reason or self._check_stop_strings(req)
            if reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.session_len):
                reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.runner.sampler.release(seq.seq_id)
        return self._output(req)

    @property
    def grammars(self):
        """Structured outputs' compiled grammars (xgrammar is imported on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                from lmconvert.runtime.grammar import Grammars

                self._grammars = Grammars(self.tokenizer, self.config.vocab_size, sorted(self.eos_ids))
        return self._grammars

    def _token_text(self, token: int) -> str:
        """A token's own text (logprobs name their tokens so); the vocabulary's texts are kept once decoded."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def _check_stop_strings(self, req: _Request) -> str | None:
        text, stops = req.detok.text, req.seq.params.stop
        for stop in stops:
            at = text.find(stop, max(0, req.sent - len(stop)))
            if at != -1:
                req.text_end = at if req.text_end is None else min(req.text_end, at)
        return "stop" if req.text_end is not None else None

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        text = req.detok.text[:req.text_end]
        # While running, hold back a tail that could still grow into a stop string.
        end = len(text) if seq.finished else len(text) - _stop_prefix_len(text, seq.params.stop)
        delta, req.sent = text[req.sent:end], max(req.sent, end)
        if seq.finished:
            self.requests.pop(seq.seq_id, None)
        return RequestOutput(seq.seq_id, text, delta, list(seq.output_ids), len(seq.prompt_ids),
                             seq.finished, seq.finish_reason,
                             None if seq.params.logprobs is None else list(req.logprobs))

    # ---- conveniences ----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, vocab] of one whole sequence (eval, tests): without the KV cache, except with int8
        KV, where they come through the paged cache (prefill chunks) so that they see the quantized K/V."""
        if self.kv_int8:
            return torch.cat([out for _, out in self.score([token_ids], self.scheduler.cfg.max_num_batched_tokens)])
        return self.runner.logits(token_ids)

    def score(self, sequences: list[list[int]], chunk: int = 1):
        """Teacher-forced pass of whole token sequences through the paged KV cache. Each step feeds every
        unfinished sequence its next `chunk` tokens (1: the decode path) and yields (sequence index, fp32
        logits [n, vocab] of those tokens). Takes blocks for all sequences at once from the free pool (call
        it with no requests in flight); frees them when done."""
        seqs = [Sequence(list(ids), SamplingParams()) for ids in sequences]
        try:
            for seq in seqs:
                if not self.block_manager.ensure_slots(seq, seq.num_tokens):
                    raise UserError(f"the KV cache holds {self.runner.num_blocks * self.block_manager.block_size} "
                                    f"tokens, fewer than the {sum(map(len, sequences))} to score at once")
            while live := [(i, seq) for i, seq in enumerate(seqs) if seq.num_computed < seq.num_tokens]:
                batch = [(seq, min(chunk, seq.num_tokens - seq.num_computed)) for _, seq in live]
                rows = self.runner.teacher_forced(batch).split([n for _, n in batch])
                for (i, seq), (_, n), out in zip(live, batch, rows):
                    seq.num_computed += n
                    yield i, out
        finally:
            for seq in seqs:
                self.block_manager.free_seq(seq)

    def reserve_kv_cache(self) -> None:
        """The whole KV cache resident now; `serve` calls this (a one-process CPU cache otherwise fills as used;
        GPU memory is committed when allocated)."""
        if self.device.type == "cpu" and isinstance(self.runner, ModelRunner):
            self.runner.reserve_kv_cache()

    def close(self) -> None:
        """Stops tensor-parallel workers (a no-op at tp=1); also runs at interpreter exit."""
        self.runner.close()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[int, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None):
        """Yields RequestOutputs for one request as tokens arrive (other requests added meanwhile also advance)."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
