"""Real weights: the shipped SmolLM2-135M-Instruct GGUF through convert, runtime and chat."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmconvert.runtime import LLMEngine

QUESTION = "What is the capital of France?"


EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
          "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
          "Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, "
          "and to crown the centennial anniversary of the French Revolution.")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """(64 token ids, fp32 logits) from transformers' own load of the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = tok(EIFFEL)["input_ids"][:64]
    assert len(ids) == 64
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0]


def test_fp32_engine_logits_match_transformers(smollm2_gguf, reference, tmp_path):
    """An fp32 engine keeps the dequantized GGUF weights exactly: logits agree to 1e-3 relative."""
    from lmconvert.convert import convert

    ids, ref = reference
    engine_dir = convert(str(smollm2_gguf), str(tmp_path / "fp32"), arch="llama", dtype="fp32")
    ours = LLMEngine(str(engine_dir), device="cpu", num_cache_tokens=256).logits(ids)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-3


def test_bf16_engine_logits_close(smollm2_engine, reference):
    """The default bf16 engine differs only by bf16 rounding of the weights (run in fp32 here)."""
    ids, ref = reference
    ours = LLMEngine(str(smollm2_engine), device="cpu", dtype="fp32", num_cache_tokens=256).logits(ids)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95


def test_piped_chat_answers_paris(smollm2_engine):
    result = subprocess.run(
        [sys.executable, "-m", "lmconvert.cli", "chat", str(smollm2_engine), "--temperature", "0",
         "--max-new-tokens", "24", "--device", "cpu"],
        input=QUESTION + "\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_prints_only_the_text(smollm2_engine):
    result = subprocess.run(
        [sys.executable, "-m", "lmconvert.cli", "generate", str(smollm2_engine), "--prompt", QUESTION, "--chat",
         "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris")
