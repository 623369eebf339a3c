"""Perplexity through the paged KV cache, fp KV vs int8 KV (issue #8: int8 KV within +0.5%).

    python benchmarks/kv_quality.py                          # SmolLM2, 4 x 1024 tokens of heldout_other, token by token
    python benchmarks/kv_quality.py --seqs 4 --seq-len 2048 --text benchmarks/data/heldout_indomain.txt
    python benchmarks/kv_quality.py --chunk 64               # prefill chunks over the cache instead of decode steps

Each text window is fed teacher-forced through the runtime (LLMEngine.score): with --chunk 1 every step is a
batched decode step, so every token's logits come from paged attention over the cache written so far, and
with int8 KV every key and value it reads was quantized on write. Windows are consecutive slices of the
text tokenized whole; the first token of each is only context. Also reports the perplexity of the positions
past --long-from alone (the long-context part) and the cache-free (dense) perplexity of the same windows,
which fp KV must reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmconvert.errors import UserError
from lmconvert.runtime import LLMEngine

DATA = Path(__file__).parent / "data"


def windows(engine: LLMEngine, text: str, n: int, length: int) -> list[list[int]]:
    ids = engine.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < n * length:
        raise UserError(f"the text has {len(ids)} tokens, fewer than {n} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def token_nll(engine: LLMEngine, seqs: list[list[int]], chunk: int) -> torch.Tensor:
    """[num_seqs, seq_len - 1] negative log-likelihood of each token after the first, through the cache."""
    nll = torch.zeros(len(seqs), len(seqs[0]) - 1, dtype=torch.float64)
    done = [0] * len(seqs)  # positions scored so far, per sequence
    total, reported = sum(map(len, seqs)), 0
    for i, logits in engine.score(seqs, chunk):
        start, n = done[i], logits.shape[0]
        if sum(done) >= reported + total // 8:  # a line per eighth: CPU runs take minutes
            reported = sum(done)
            print(f"  {reported}/{total} tokens", flush=True)
        targets = torch.tensor(seqs[i][start + 1:start + n + 1], dtype=torch.long, device=logits.device)
        rows = logits[:len(targets)]  # the last position predicts nothing
        nll[i, start:start + len(targets)] = F.cross_entropy(rows, targets, reduction="none").double().cpu()
        done[i] += n
    return nll


def dense_nll(engine: LLMEngine, seqs: list[list[int]]) -> torch.Tensor:
    rows = [engine.runner.logits(ids)[:-1] for ids in seqs]  # the runner's: cache-free even with int8 KV
    return torch.stack([F.cross_entropy(r, torch.tensor(ids[1:], device=r.device), reduction="none").double().cpu()
                        for r, ids in zip(rows, seqs)])


def ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="engine dir, checkpoint or source alias")
    ap.add_argument("--text", default=str(DATA / "heldout_other.txt"))
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1, help="tokens per sequence per step (1 = decode path)")
    ap.add_argument("--long-from", type=int, default=512, help="positions from here on count as long context")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the engine's; fp32 on CPU)")
    ap.add_argument("--no-dense", action="store_true", help="skip the cache-free reference")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    result = dict(model=args.model, text=Path(args.text).name, seqs=args.seqs, seq_len=args.seq_len, chunk=args.chunk)
    for kv in ("fp", "int8"):
        engine = LLMEngine(args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                           num_cache_tokens=args.seqs * (args.seq_len + args.block_size), session_len=args.seq_len + 1,
                           max_batch_size=max(args.seqs, 1), kv_int8=kv == "int8")
        seqs = windows(engine, text, args.seqs, args.seq_len)
        start = time.monotonic()
        nll = token_nll(engine, seqs, args.chunk)
        result[f"ppl_{kv}"] = ppl(nll)
        result[f"ppl_{kv}_long"] = ppl(nll[:, args.long_from - 1:])  # targets at positions >= long_from
        result[f"seconds_{kv}"] = round(time.monotonic() - start, 1)
        if kv == "fp" and not args.no_dense:
            result["ppl_dense"] = ppl(dense_nll(engine, seqs))
        result["device"], result["dtype"] = str(engine.device), str(engine.dtype).removeprefix("torch.")
        print(kv, {k: v for k, v in result.items() if k.endswith(kv) or k.endswith(f"{kv}_long")}, flush=True)
        del engine
    result["int8_vs_fp_pct"] = 100 * (result["ppl_int8"] / result["ppl_fp"] - 1)
    result["int8_vs_fp_long_pct"] = 100 * (result["ppl_int8_long"] / result["ppl_fp_long"] - 1)
    for key, value in result.items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
