"""Reasoning parsers: route `<think>…</think>` text to `reasoning_content`, in whole replies and in streams."""

from __future__ import annotations

from lmconvert.errors import UserError
from lmconvert.runtime.chat import THINK_CLOSE, THINK_OPEN, ThinkSplitter

REASONING_PARSERS = ("qwen3", "qwen-qwq")  # both use <think>…</think>; QwQ's template opens <think> itself


def check_reasoning_parser(name: str | None) -> str | None:
    if name is not None and name not in REASONING_PARSERS:
        raise UserError(f"unknown reasoning parser {name!r}; choose from {', '.join(REASONING_PARSERS)}")
    return name


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the rendered prompt leaves a <think> open, so the answer starts inside the reasoning
    (QwQ and Qwen3-Thinking templates end with "<think>\\n"; Qwen3 with enable_thinking=False closes it)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


class ReasoningStream:
    """Feeds engine deltas, returns (reasoning, content) text for each one; tags may be split across deltas."""

    def __init__(self, starts_in_think: bool = False):
        self.splitter = ThinkSplitter()
        self.splitter.in_think = starts_in_think

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = [], []
        for think, piece in self.splitter.feed(delta, final=final):
            (reasoning if think else content).append(piece)
        return "".join(reasoning), "".join(content)


def split_reasoning(text: str, starts_in_think: bool = False) -> tuple[str | None, str]:
    """A whole reply as (reasoning, or None when empty, content)."""
    reasoning, content = ReasoningStream(starts_in_think).feed(text, final=True)
    return reasoning or None, content
