"""Loaders: source resolution (paths, caches, aliases), config normalization, GGUF against transformers."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmconvert.arch import get_arch
from lmconvert.errors import UserError
from lmconvert.load import open_checkpoint, resolve_source
from lmconvert.load.gguf_file import unpermute_rows
from lmconvert.load.hparams import hf_model_config


def test_hf_cache_model_id(tiny_checkpoint, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--Tiny--Qwen3"
    shutil.copytree(tiny_checkpoint("qwen3"), repo / "snapshots" / "abc123")
    (repo / "snapshots" / "old999").mkdir()  # a stale revision that refs/main does not point at
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("LMCONVERT_USE_MODELSCOPE", raising=False)
    assert resolve_source("Tiny/Qwen3") == repo / "snapshots" / "abc123"
    assert open_checkpoint("Tiny/Qwen3", arch="qwen3").config.qk_norm


def test_modelscope_cache_model_id(tiny_checkpoint, tmp_path, monkeypatch):
    shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "ms" / "models" / "Tiny" / "Qwen2___5")
    (tmp_path / "ms" / "models" / "Tiny" / "Qwen2___5" / "configuration.json").write_text("{}")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="Hugging Face cache"):
        resolve_source("Tiny/Qwen2.5")
    monkeypatch.setenv("LMCONVERT_USE_MODELSCOPE", "1")
    assert open_checkpoint("Tiny/Qwen2.5").arch.name == "qwen2"
    monkeypatch.delenv("LMCONVERT_USE_MODELSCOPE")
    assert resolve_source("Tiny/Qwen2.5", model_source="modelscope").name == "Qwen2___5"


def test_missing_model_id_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("LMCONVERT_USE_MODELSCOPE", raising=False)
    with pytest.raises(UserError) as e:
        resolve_source("Nobody/Nothing")
    assert str(tmp_path / "hub") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_source("./not/here/at/all")


def test_pickle_only_checkpoint_refused(tiny_checkpoint, tmp_path):
    dst = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint("llama"), dst)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="pickle"):
        open_checkpoint(dst)


def test_old_style_rope_and_generation_eos():
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "rope_theta": 5e5, "eos_token_id": 7,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float16"}
    c = hf_model_config(get_arch("llama"), cfg, {"eos_token_id": [7, 9]})
    assert c.rope_theta == 5e5 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.eos_token_ids == [7, 9] and c.dtype == "fp16" and c.num_kv_heads == 4 and c.head_dim == 16
    cfg["sliding_window"] = 4096  # llama does not honour a window even if the config has one
    assert hf_model_config(get_arch("llama"), cfg, {}).sliding_window is None


def test_arch_mismatch(tiny_checkpoint):
    with pytest.raises(UserError, match="mismatch"):
        open_checkpoint(tiny_checkpoint("qwen2"), arch="llama")
    with pytest.raises(UserError, match="supported: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        open_checkpoint(tiny_checkpoint("qwen2"), arch="gpt2")


def test_unpermute_inverts_llama_cpp_layout():
    heads, d = 3, 8
    w = torch.arange(heads * d * 2, dtype=torch.float32).reshape(heads * d, 2)
    # llama.cpp interleaves the two rotary halves of each head: row order per head 0, d/2, 1, d/2+1, ...
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    permuted = torch.cat([w[h * d + order] for h in range(heads)])
    assert torch.equal(unpermute_rows(permuted, heads), w)


@pytest.mark.slow
def test_gguf_matches_transformers(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(smollm2_gguf, arch="llama")
    c = ckpt.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.dtype == "bf16" and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert c.eos_token_ids == [2]
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    sd = model.state_dict()
    torch.testing.assert_close(ckpt.get("embed_tokens.weight"), sd["model.embed_tokens.weight"], rtol=1e-6, atol=1e-6)
    for i in (0, 29):
        for name in get_arch("llama").layer_names():
            got, want = ckpt.get(f"layers.{i}.{name}"), sd[get_arch("llama").hf_name(f"layers.{i}.{name}")]
            torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6, msg=f"layer {i} {name}")
    with pytest.raises(UserError, match="mismatch"):
        open_checkpoint(smollm2_gguf, arch="qwen3")
