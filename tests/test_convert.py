"""convert(): fused engine tensors equal the source checkpoint (read by transformers), config normalized."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmconvert.convert import ConvertedModel, convert
from lmconvert.engine import open_engine, open_model

ARCHS = ["qwen3", "qwen2", "llama", "mistral"]


def hf_state(ckpt_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def expected_layer(sd: dict, i: int) -> dict:
    p = f"model.layers.{i}."
    out = {
        "input_norm.weight": sd[p + "input_layernorm.weight"],
        "post_attn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        "qkv_proj.weight": torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        "o_proj.weight": sd[p + "self_attn.o_proj.weight"],
        "gate_up_proj.weight": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
        "down_proj.weight": sd[p + "mlp.down_proj.weight"],
    }
    if p + "self_attn.q_proj.bias" in sd:
        out["qkv_proj.bias"] = torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
    if p + "self_attn.q_norm.weight" in sd:
        out["q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
        out["k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_matches_transformers(arch, tiny_checkpoint, tiny_engine):
    hf_config, sd = hf_state(tiny_checkpoint(arch))
    engine = open_engine(tiny_engine(arch), verify=True)
    for i in range(hf_config.num_hidden_layers):
        got = engine.layer_tensors(i)
        want = expected_layer(sd, i)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    globals_ = engine.global_tensors()
    torch.testing.assert_close(globals_["embed_tokens.weight"], sd["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(globals_["norm.weight"], sd["model.norm.weight"], rtol=0, atol=0)
    assert ("lm_head.weight" in globals_) == (not hf_config.tie_word_embeddings)
    if not hf_config.tie_word_embeddings:
        torch.testing.assert_close(globals_["lm_head.weight"], sd["lm_head.weight"], rtol=0, atol=0)


def test_config_normalization(tiny_engine):
    qwen3, qwen2 = open_engine(tiny_engine("qwen3")).config, open_engine(tiny_engine("qwen2")).config
    llama, mistral = open_engine(tiny_engine("llama")).config, open_engine(tiny_engine("mistral")).config
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.tie_word_embeddings and qwen3.head_dim == 16
    assert qwen2.qkv_bias and not qwen2.qk_norm and not qwen2.tie_word_embeddings
    assert llama.rope_theta == 500000.0
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert mistral.sliding_window == 8 and llama.sliding_window is None
    for c in (qwen3, qwen2, llama, mistral):
        assert c.dtype == "fp32" and c.eos_token_ids == [2] and c.num_kv_heads == 2 and c.quantization == {}


def test_dtype_cast(tiny_checkpoint, tiny_engine):
    engine = open_engine(tiny_engine("qwen2", "bf16"))
    assert engine.config.dtype == "bf16"
    _, sd = hf_state(tiny_checkpoint("qwen2"))
    qkv = engine.layer_tensors(1)["qkv_proj.bias"]
    assert qkv.dtype == torch.bfloat16
    want = torch.cat([sd[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv"]).to(torch.bfloat16)
    assert torch.equal(qkv, want)


def test_sharded_checkpoint_gives_identical_engine(tiny_checkpoint, tmp_path):
    sharded = tiny_checkpoint("qwen2", sharded=True)
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    a = convert(str(tiny_checkpoint("qwen2")), tmp_path / "a", arch="qwen2")
    b = convert(str(sharded), tmp_path / "b", arch="auto")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_open_model_in_memory_equals_engine(tiny_checkpoint, tiny_engine):
    engine = open_model(tiny_engine("qwen3"))
    memory = open_model(tiny_checkpoint("qwen3"), arch="qwen3")
    assert isinstance(memory, ConvertedModel)
    assert memory.config == engine.config
    for i in range(engine.config.num_layers):
        a, b = engine.layer_tensors(i), memory.layer_tensors(i)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tok = memory.load_tokenizer()
    assert tok.chat_template == engine.load_tokenizer().chat_template and tok.chat_template


def test_engine_files_are_self_describing(tiny_engine):
    root = tiny_engine("llama")
    layer = load_file(root / "layers" / "layer_00001.safetensors")
    assert "layers.1.qkv_proj.weight" in layer
    config = json.loads((root / "config.json").read_text())
    assert config["format_version"] == 1 and config["quantization"] == {}
