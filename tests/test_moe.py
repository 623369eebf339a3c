"""Mixture-of-experts models (issue #26): tiny random Qwen3-MoE (with a dense layer) and Mixtral built with
transformers, through convert, the runtime, continuous batching, quantization, GGUF and tensor parallelism."""

from __future__ import annotations

import json

import pytest
import torch

from lmconvert.engine import open_engine
from lmconvert.runtime import LLMEngine, SamplingParams
from tiny_models import MOE_ARCHS

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_config_and_engine_layout(tiny_checkpoint, tiny_engine):
    """Experts are stored fused per layer ([E, 2I, H] gate ‖ up, [E, H, I] down) next to the router, in format 4;
    Qwen3-MoE's mlp_only_layers keep a dense MLP."""
    engine = open_engine(tiny_engine("qwen3_moe"), verify=True)
    cfg = engine.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert cfg.norm_topk_prob and cfg.dense_layers == [1]
    assert json.loads((engine.path / "config.json").read_text())["format_version"] == 4
    sd = hf_model(tiny_checkpoint("qwen3_moe")).state_dict()
    moe, dense = engine.layer_tensors(0), engine.layer_tensors(1)
    assert torch.equal(moe["router.weight"], sd["model.layers.0.mlp.gate.weight"])
    assert torch.equal(moe["experts.gate_up_proj.weight"], sd["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(moe["experts.down_proj.weight"], sd["model.layers.0.mlp.experts.down_proj"])
    assert "gate_up_proj.weight" not in moe and "router.weight" not in dense
    assert dense["gate_up_proj.weight"].shape == (2 * 128, 64)

    mixtral = open_engine(tiny_engine("mixtral")).config
    assert mixtral.norm_topk_prob and mixtral.dense_layers == [] and mixtral.moe_intermediate_size == 48
    assert mixtral.sliding_window == 8


def test_dense_engine_config_has_no_moe_fields(tiny_engine):
    """A dense engine's config.json is what readers without MoE read (format 1, no new fields)."""
    config = json.loads((tiny_engine("qwen3") / "config.json").read_text())
    assert config["format_version"] == 1 and "num_experts" not in config


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_match_transformers(arch, tiny_checkpoint, tiny_engine):
    engine = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=1024)
    ids = random_ids(40, seed=1)
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint(arch))(torch.tensor([ids])).logits[0]
    assert (engine.logits(ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_tokens_match_transformers(arch, tiny_checkpoint, tiny_engine):
    engine = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=1024, block_size=4)
    prompt = random_ids(12, seed=2)
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint(arch)).generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):]
    assert engine.generate([prompt], GREEDY)[0].token_ids == ref.tolist()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_batched_equals_solo(arch, tiny_engine):
    """Ragged prompts batched with chunked prefill and a shared prefix (prefix cache) give each one's solo tokens:
    routing is per token, so a token's experts never depend on its batch."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 33, 9)]
    prompts.append(prompts[2][:24] + [7, 8, 9])  # shares 3 blocks of 8 with prompt 2
    solo = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=2048, block_size=8)
    expected = [solo.generate([p], GREEDY)[0].token_ids for p in prompts]
    batched = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=2048, block_size=8,
                        max_num_batched_tokens=24)
    assert [o.token_ids for o in batched.generate(prompts, GREEDY)] == expected


def test_checkpoint_runs_without_converting(tiny_checkpoint, tiny_engine):
    ids = random_ids(20, seed=4)
    from_ckpt = LLMEngine(str(tiny_checkpoint("mixtral")), device="cpu", dtype="fp32", num_cache_tokens=256)
    from_engine = LLMEngine(str(tiny_engine("mixtral")), device="cpu", num_cache_tokens=256)
    assert torch.equal(from_ckpt.logits(ids), from_engine.logits(ids))
