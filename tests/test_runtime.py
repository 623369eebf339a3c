"""The runtime against transformers on tiny random checkpoints of every architecture (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from lmconvert.runtime import LLMEngine, SamplingParams

ARCHS = ["qwen3", "qwen2", "llama", "mistral"]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(n: int, seed: int, vocab: int = 300) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tiny_checkpoint, tiny_engine):
    engine = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=1024)
    ids = random_ids(40, seed=1)  # longer than mistral's sliding window of 8
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint(arch))(torch.tensor([ids])).logits[0]
    ours = engine.logits(ids)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(arch, tiny_checkpoint, tiny_engine):
    engine = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=1024, block_size=4)
    prompt = random_ids(12, seed=2)
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint(arch)).generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):]
    out = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref.tolist()


def test_checkpoint_runs_without_converting(tiny_checkpoint, tiny_engine):
    """chat/generate accept a checkpoint directory: converted in memory, same logits as the engine."""
    ids = random_ids(20, seed=3)
    from_ckpt = LLMEngine(str(tiny_checkpoint("qwen2")), device="cpu", dtype="fp32", num_cache_tokens=256)
    from_engine = LLMEngine(str(tiny_engine("qwen2")), device="cpu", num_cache_tokens=256)
    assert torch.equal(from_ckpt.logits(ids), from_engine.logits(ids))
