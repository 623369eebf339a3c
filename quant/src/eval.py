"""Perplexity of any engine (fp, W4, W8) or checkpoint on a text file.

The text is tokenized whole with the model's tokenizer (no special tokens) and cut into non-overlapping
windows of seq_len tokens; the first `windows` of them are scored, each on its own (no carried context),
every token but a window's first being predicted. On CPU the default compute dtype is fp32: bf16 matmuls
are many times slower there, and the weights (or the quantized grid) are upcast exactly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress

from lmconvert.errors import UserError
from lmconvert.progress import progress


@dataclass(slots=True)
class EvalResult:
    ppl: float
    tokens: int  # predicted tokens
    seconds: float

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "seconds": round(self.seconds, 2)}


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def text_windows(tokenizer, text: str, seq_len: int, windows: int) -> list[list[int]]:
    if seq_len < 2 or windows < 1:
        raise UserError("--seq-len must be at least 2 and --windows at least 1")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = min(windows, len(ids) // seq_len)
    if n == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def perplexity(engine, text: str, seq_len: int = 512, windows: int = 40, show_progress: bool = True) -> EvalResult:
    """engine: a runtime LLMEngine. Returns exp(mean negative log-likelihood) over the windows."""
    start = time.monotonic()
    chunks = text_windows(engine.tokenizer, text, seq_len, windows)
    nll, count = 0.0, 0
    with (progress(transient=True) if show_progress else Progress(disable=True)) as bar:
        task = bar.add_task(f"perplexity over {len(chunks)} windows of {seq_len} tokens", total=len(chunks))
        for chunk in chunks:
            logits = engine.logits(chunk)
            target = torch.tensor(chunk[1:], device=logits.device)
            nll += F.cross_entropy(logits[:-1], target, reduction="sum").item()
            count += len(chunk) - 1
            bar.advance(task)
    return EvalResult(math.exp(nll / count), count, time.monotonic() - start)


def engine_defaults(opts: dict, seq_len: int) -> dict:
    """Engine options for scoring: session and KV cache of one window, fp32 compute on CPU unless asked."""
    from lmconvert.devices import resolve_device

    opts = dict(opts)
    opts["device"] = opts.get("device") or str(resolve_device(None))
    if opts.get("dtype") is None and torch.device(opts["device"]).type == "cpu":
        opts["dtype"] = "fp32"
    opts["session_len"] = opts.get("session_len") or seq_len + 1
    opts["num_cache_tokens"] = opts.get("num_cache_tokens") or seq_len + 16
    opts["eager"] = True  # scoring is prefill only: no decode step to compile or capture
    return opts


def open_for_eval(model: str, seq_len: int = 512, **opts):
    from lmconvert.runtime import LLMEngine

    opts = engine_defaults(opts, seq_len)
    return LLMEngine(model, **{k: v for k, v in opts.items() if k != "eager"})  # LLMEngine decodes eagerly by default
