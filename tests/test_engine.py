"""Engine directories: manifest checks, atomic writes, overwrite, the GGUF engine end to end."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmconvert.config import ModelConfig
from lmconvert.convert import convert
from lmconvert.engine import EngineWriter, open_engine, open_model
from lmconvert.errors import UserError


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(tiny_engine("qwen2"), dst)
    return dst


def test_corrupt_byte_detected_by_verify(engine_copy):
    path = engine_copy / "layers" / "layer_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    open_engine(engine_copy)  # same size: only the checksum can tell
    with pytest.raises(UserError, match="layer_00001.safetensors is corrupt"):
        open_engine(engine_copy, verify=True)


def test_truncated_file_detected_without_verify(engine_copy):
    path = engine_copy / "globals.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="globals.safetensors is truncated"):
        open_engine(engine_copy)


def test_missing_file_named(engine_copy):
    (engine_copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json is missing"):
        open_engine(engine_copy)


def test_not_an_engine(tiny_checkpoint):
    with pytest.raises(UserError, match="not an lmconvert engine"):
        open_engine(tiny_checkpoint("qwen2"))


def test_checkpoint_without_tokenizer_leaves_nothing(tiny_checkpoint, tmp_path):
    src = tmp_path / "no-tok"
    shutil.copytree(tiny_checkpoint("llama"), src)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / name).unlink()
    with pytest.raises(UserError, match="no tokenizer"):
        convert(str(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tok"]  # no temp dir left behind either


def test_error_mid_write_keeps_old_engine(engine_copy, tiny_engine):
    before = open_engine(engine_copy).layer_tensors(0)
    config = open_engine(engine_copy).config
    with pytest.raises(RuntimeError, match="boom"):
        with EngineWriter(engine_copy, overwrite=True) as w:
            w.write_layer(0, {"o_proj.weight": torch.zeros(2, 2)})
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="incomplete engine"):
        with EngineWriter(engine_copy, overwrite=True) as w:
            w.write_config(config)
    after = open_engine(engine_copy, verify=True).layer_tensors(0)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in engine_copy.parent.iterdir()) == ["engine"]


def test_overwrite_replaces(engine_copy, tiny_checkpoint):
    with pytest.raises(UserError, match="already exists"):
        convert(str(tiny_checkpoint("llama")), engine_copy)
    convert(str(tiny_checkpoint("llama")), engine_copy, overwrite=True)
    assert open_engine(engine_copy, verify=True).config.arch == "llama"


def test_writer_is_usable_for_quantized_engines(tiny_engine, tmp_path):
    """What quantization does: copy a source engine layer by layer with new tensors and a quantization block."""
    src = open_engine(tiny_engine("qwen3"))
    config = ModelConfig.from_dict({**src.config.to_dict(), "quantization": {"method": "test", "bits": 4}})
    with EngineWriter(tmp_path / "q") as w:
        w.write_globals(src.global_tensors())
        for i in range(config.num_layers):
            w.write_layer(i, {**src.layer_tensors(i), "qkv_proj.qweight": torch.ones(2, 3, dtype=torch.int32)})
        src.save_tokenizer(w.tokenizer_dir)
        w.write_config(config, src.generation_config)
    out = open_model(tmp_path / "q", arch="qwen3", dtype="bf16")
    assert out.config.quantization == {"method": "test", "bits": 4} and out.config.dtype == "bf16"
    layer = out.layer_tensors(1)
    assert layer["qkv_proj.qweight"].dtype == torch.int32 and layer["qkv_proj.weight"].dtype == torch.bfloat16
    assert out.load_tokenizer().chat_template


@pytest.mark.slow
def test_gguf_engine_end_to_end(smollm2_gguf, tmp_path):
    dst = convert("smollm2", tmp_path / "smol", arch="llama")
    engine = open_engine(dst, verify=True)
    assert engine.config.dtype == "bf16" and engine.config.num_layers == 30
    assert "lm_head.weight" not in engine.global_tensors()
    assert engine.layer_tensors(0)["qkv_proj.weight"].shape == (576 + 2 * 192, 576)
    tok = engine.load_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(engine.config.eos_token_ids) == ["<|im_end|>"]


def test_write_safetensors_reads_back_with_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    from lmconvert.engine.writer import SAFETENSORS_DTYPES, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}": (torch.randn(3, 5, generator=g) * 50).to(dtype) for dtype in SAFETENSORS_DTYPES}
    tensors["strided"] = torch.randn(4, 6, generator=g)[:, ::2]  # not contiguous
    tensors["empty"] = torch.empty(0, 4)
    write_safetensors(tensors, tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), name
