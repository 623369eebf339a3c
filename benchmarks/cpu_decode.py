"""CPU batch-1 decode speed of an engine vs transformers on the same cores, interleaved to share the noise.

    python benchmarks/cpu_decode.py ENGINE [--rounds 3] [--input-len 64] [--output-len 64]

Both run fp32 (what each uses on CPU by default); transformers gets a model of the same architecture and sizes
(lmconvert.runtime.bench.hf_equivalent: speed does not depend on the weights' values). Prints each round and
the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.bench import hf_equivalent, random_prompts


def ours_tok_s(engine: LLMEngine, prompt: list[int], n: int) -> float:
    rid = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    engine.step()  # prefill + first token
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    del rid
    return (n - 1) / (time.perf_counter() - start)


@torch.inference_mode()
def hf_tok_s(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(n - 1):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (n - 1) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    engine = LLMEngine(args.engine, device="cpu", num_cache_tokens=2048)
    model = hf_equivalent(engine.config, torch.device("cpu"), torch.float32)
    prompt = random_prompts(1, args.input_len, engine.config.vocab_size)[0]
    ours_tok_s(engine, prompt, 8)
    hf_tok_s(model, prompt, 8)
    ratios = []
    for r in range(args.rounds):
        a, b = ours_tok_s(engine, prompt, args.output_len), hf_tok_s(model, prompt, args.output_len)
        ratios.append(a / b)
        print(f"round {r}: lmconvert {a:.2f} tok/s, transformers {b:.2f} tok/s, ratio {a / b:.2f}", flush=True)
    print(f"median ratio {statistics.median(ratios):.2f} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
