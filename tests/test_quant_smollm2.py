"""Real weights: SmolLM2-135M quantized to W4 (AWQ g64, small calibration) and W8 still knows its capitals."""

from __future__ import annotations

import pytest

from lmconvert.quant import QuantConfig, quantize
from lmconvert.runtime import LLMEngine, SamplingParams

pytestmark = pytest.mark.slow


def answer(path) -> str:
    engine = LLMEngine(str(path), device="cpu", dtype="fp32", num_cache_tokens=256)  # fp32: fast matmuls on CPU
    prompt = engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    return engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].text


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_smollm2_answers_paris(bits, smollm2_gguf, tmp_path):
    # CI-sized calibration: 2 windows of 256 tokens of the shipped set (the real default is 16 x 512)
    qc = QuantConfig(bits=bits, group_size=64 if bits == 4 else None, calib_samples=2, calib_seqlen=256,
                     loss_tokens=256, grid=6, device="cpu")
    result = quantize(smollm2_gguf, tmp_path / "engine", qc, arch="llama")
    assert result.method == ("awq" if bits == 4 else "int8")
    assert result.compression > (2.2 if bits == 4 else 1.6)  # embeddings (tied, 28M of 135M) stay 16-bit
    assert "Paris" in answer(result.path)


def test_w8a8_smollm2_answers_paris(smollm2_gguf, tmp_path):
    # smoothing factors need a few more activations than AWQ here: 2 x 256 tokens flip the greedy answer
    qc = QuantConfig(bits=8, group_size=None, activation_bits=8, calib_samples=4, calib_seqlen=256, loss_tokens=256,
                     device="cpu")
    result = quantize(smollm2_gguf, tmp_path / "engine", qc, arch="llama")
    assert result.method == "smoothquant" and result.compression > 1.6
    assert all(s.loss < s.loss_rtn for s in result.layers)  # smoothing lowers every layer's W8A8 error
    assert "Paris" in answer(result.path)
