"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, penalties, per-request seed, logprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmconvert.runtime.grammar import Guided, mask_logits_


MAX_LOGPROBS = 20  # top alternatives a token may report (OpenAI's top_logprobs limit)
NON_FINITE = -1  # the host's token id for a row whose logits held NaN: its request ends with an error


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens' (id, log-probability);
    the engine adds their texts (top_texts) as it books the token."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    text: str = ""
    top_texts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StepLogprobs:
    """Log-probabilities of one step's sampled tokens [B] and of each row's K most likely tokens [B, K]: the
    log-softmax of the model's logits as they come out of the model, before penalties, temperature, top-k/p
    (what OpenAI and vLLM report: the model's distribution, not the sampler's)."""
    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor
    ks: list[int | None]  # each row's k (SamplingParams.logprobs; None: that row asked for none)

    def rows(self, tokens: list[int]) -> list[TokenLogprob | None]:
        """Per row on the host, for the sampled tokens, with each row's own k."""
        chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        return [None if k is None else TokenLogprob(tokens[r], chosen[r], list(zip(ids[r][:k], values[r][:k])))
                for r, k in enumerate(self.ks)]


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF semantics: >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely tokens'
    guided: Guided | None = None  # structured output: the answer must match this JSON schema / grammar

    def __post_init__(self):
        if self.temperature < 0 or self.top_p <= 0 or self.top_p > 1 or self.top_k < 0 or self.max_tokens < 1:
            raise ValueError("invalid sampling parameters: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_tokens >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must lie in [0, {MAX_LOGPROBS}]")

    @property
    def penalized(self) -> bool:
        """Repetition / presence / frequency penalties: sampling reads the tokens so far (on the host)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def generation_defaults(gen: dict) -> dict:
    """Sampling fields a model's generation_config.json sets (do_sample false means greedy)."""
    return {"temperature": gen.get("temperature", 1.0) if gen.get("do_sample", True) else 0.0,
            "top_p": gen.get("top_p", 1.0), "top_k": gen.get("top_k", 0) or 0,
            "repetition_penalty": gen.get("repetition_penalty", 1.0)}


def _apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    if not p.penalized:
        return
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device, dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)


class Sampler:
    """Picks one token per row of fp32 logits [B, V]; rows are sequences with their own parameters."""

    def __init__(self):
        self._generators: dict[int, torch.Generator] = {}  # seq id -> generator, for seeded requests
        self.inject_nan = False  # test-only (runtime/src/faults.py): the next call's first row turns NaN

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: int, seed: int, device) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = torch.Generator(device=device).manual_seed(seed)
        return gen

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs) -> tuple[torch.Tensor, StepLogprobs | None, torch.Tensor]:
        """int64 [B] token ids on the logits' device (no host sync), their logprobs when a row asks, and a
        [B] bool of rows whose logits held NaN (a broken step: their tokens are meaningless)."""
        if self.inject_nan:
            logits[0] = float("nan")
            self.inject_nan = False
        ks = [s.params.logprobs for s in seqs]
        logprobs = None
        if any(k is not None for k in ks):  # the model's distribution: before the penalties change logits
            logprobs = torch.log_softmax(logits, dim=-1)
            top_values, top_ids = logprobs.topk(max(1, *(k for k in ks if k is not None)), dim=-1)
        tokens, greedy = self._sample(logits, seqs)
        # argmax returns a NaN's position when a row holds one (masks and penalties keep NaN NaN): a [B] gather,
        # not a scan of the [B, V] logits every step
        broken = logits.gather(1, greedy.unsqueeze(1)).squeeze(1).isnan()
        if logprobs is None:
            return tokens, None, broken
        return tokens, StepLogprobs(logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1), top_values, top_ids, ks), broken

    def _sample(self, logits: torch.Tensor, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """The picked tokens and the rows' argmax (after masks and penalties)."""
        if any(seq.matcher is not None for seq in seqs):  # structured outputs: the one grammar hook
            mask_logits_(logits, [seq.matcher for seq in seqs])
        for row, seq in enumerate(seqs):
            _apply_penalties(logits[row], seq.params, seq.prompt_ids, seq.output_ids)
        greedy = logits.argmax(dim=-1)
        if all(s.params.greedy for s in seqs):
            return greedy, greedy
        dev = logits.device
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev).unsqueeze(1)
        probs = torch.softmax(logits / temps, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(probs.shape[-1], device=dev).unsqueeze(0)
        top_k = torch.tensor([s.params.top_k or probs.shape[-1] for s in seqs], device=dev).unsqueeze(1)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev).unsqueeze(1)
        # keep a token while fewer than top_k precede it and the mass before it is under top_p
        keep = (ranks < top_k) & ((sorted_probs.cumsum(-1) - sorted_probs) < top_p)
        sorted_probs = sorted_probs * keep
        # Gumbel-max in its exponential form: argmax(p / E), E ~ Exp(1); seeded rows draw from their generator
        noise = torch.empty_like(sorted_probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                noise[row].exponential_(generator=self._generator(seq.seq_id, seq.params.seed, dev))
        picked = order.gather(1, (sorted_probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)
        is_greedy = torch.tensor([s.params.greedy for s in seqs], device=dev)
        return torch.where(is_greedy, greedy, picked), greedy
