"""Grammar-constrained decoding (structured outputs): a request's Guided spec -> a token mask each step.

xgrammar does the grammar work (JSON schema or EBNF -> a pushdown automaton over the tokenizer's vocabulary,
with token masks precomputed where the grammar allows): it is what vLLM, SGLang and LMDeploy use, runs on CPU
and GPU, and compiles a typical schema in milliseconds. (llguidance and outlines-core do the same job;
xgrammar was chosen as the one those three servers share.) The sampler asks each constrained row's matcher
for its mask and sets the logits of every other token to -inf, so constrained and free requests share one
batch; the engine feeds each sampled token back to its matcher.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import torch

from lmconvert.errors import UserError

KINDS = ("json_object", "json_schema", "ebnf", "regex")


@dataclass(frozen=True, slots=True)
class Guided:
    """What an answer must match: a JSON object, a JSON schema (its text), an EBNF grammar or a regex."""
    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"guided decoding kind {self.kind!r}: one of {', '.join(KINDS)}")

    @classmethod
    def json(cls, schema: dict | None = None) -> Guided:
        return cls("json_object") if schema is None else cls("json_schema", json.dumps(schema, sort_keys=True))


class Grammars:
    """Compiled grammars of one tokenizer, cached by spec; a matcher per constrained sequence. stop_ids: the
    engine's end-of-answer tokens, the only ones a finished grammar allows."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgrammar.GrammarCompiler(info)  # thread-safe: the server compiles off the engine thread
        self._compile = functools.lru_cache(maxsize=256)(self._compile_uncached)

    def compile(self, guided: Guided):
        """The compiled grammar (cached); a spec xgrammar cannot take is a UserError naming why."""
        return self._compile(guided)

    def _compile_uncached(self, guided: Guided):
        try:
            if guided.kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if guided.kind == "json_schema":
                return self._compiler.compile_json_schema(guided.spec)
            if guided.kind == "regex":
                return self._compiler.compile_regex(guided.spec)
            return self._compiler.compile_grammar(guided.spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"{guided.kind}: {xgrammar_message(e)}") from None

    def matcher(self, guided: Guided):
        return self._xgr.GrammarMatcher(self.compile(guided))


def xgrammar_message(e: Exception) -> str:
    """The first line of an xgrammar error, without its "[time] file.cc:line: " prefix."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", message)


def mask_logits_(logits: torch.Tensor, matchers: list) -> None:
    """Sets to -inf, in place, the logits [B, V] of the tokens each row's matcher forbids (None: a free row)."""
    import xgrammar

    rows = [r for r, m in enumerate(matchers) if m is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for r in rows:
        matchers[r].fill_next_token_bitmask(bitmask, r)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
