"""RequestOutput.logprobs (issue #25, part 3): the log-softmax of the model's own logits for every generated
token, whatever the sampler did with them, checked against the engine's cache-free forward pass."""

from __future__ import annotations

import pytest
import torch

from lmconvert.runtime import LLMEngine, SamplingParams


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_match_the_forward_pass_in_a_mixed_batch(tiny_engine, overlap):
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=512, overlap=overlap)
    prompts = [random_ids(11, 1), random_ids(5, 2), random_ids(17, 3)]
    asks = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=4),
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),  # asks for none: gets none
            SamplingParams(max_tokens=10, temperature=0.8, seed=7, repetition_penalty=1.3, ignore_eos=True,
                           logprobs=0)]  # sampled with penalties; its logprobs stay the model's
    outs = engine.generate(prompts, asks)
    assert outs[1].logprobs is None
    for prompt, out, k in ((prompts[0], outs[0], 4), (prompts[2], outs[2], 0)):
        ref = torch.log_softmax(engine.logits(prompt + out.token_ids), -1)[len(prompt) - 1:-1]
        assert [e.token_id for e in out.logprobs] == out.token_ids
        for row, entry in zip(ref, out.logprobs):
            assert abs(entry.logprob - row[entry.token_id].item()) <= 1e-5
            top = row.topk(max(k, 1))
            assert [t for t, _ in entry.top] == top.indices[:k].tolist()
            assert len(entry.top_texts) == k and entry.text == engine.tokenizer.decode([entry.token_id])
    # the same greedy tokens as without logprobs: asking does not change sampling
    plain = engine.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert plain[0].token_ids == outs[0].token_ids


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(ValueError, match="logprobs must lie in"):
        SamplingParams(logprobs=21)
