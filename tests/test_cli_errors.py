"""CLI: every bad input gives one `error:` line on stderr, exit 1, no traceback, nothing at the destination."""

from __future__ import annotations

import shutil

import pytest

from cli_helpers import assert_one_line_error, run


@pytest.fixture
def pickle_only(tiny_checkpoint, tmp_path):
    src = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint("llama"), src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    return src


@pytest.mark.parametrize("case", ["no_such_path", "not_a_model", "unsupported_arch", "arch_mismatch",
                                  "unknown_dtype", "unwritable_dst", "pickle_only"])
def test_convert_errors(case, tiny_checkpoint, tmp_path, request):
    src, arch, extra, dst = tiny_checkpoint("qwen3"), "qwen3", [], tmp_path / "out"
    expected = {
        "no_such_path": "no such file or directory",
        "not_a_model": "is not a model",
        "unsupported_arch": "supported: llama, mistral, qwen2, qwen3",
        "arch_mismatch": "mismatch",
        "unknown_dtype": "unknown dtype 'int3'",
        "unwritable_dst": "not a writable directory",
        "pickle_only": "pickle",
    }[case]
    if case == "no_such_path":
        src = tmp_path / "nowhere"
    elif case == "not_a_model":
        src = tmp_path / "notes.txt"
        src.write_text("hello")
    elif case == "unsupported_arch":
        arch = "gpt2"
    elif case == "arch_mismatch":
        arch = "llama"
    elif case == "unknown_dtype":
        extra = ["--dtype", "int3"]
    elif case == "unwritable_dst":
        (tmp_path / "file").write_text("x")
        dst = tmp_path / "file" / "engine"  # parent is a file: fails for root too, unlike chmod
    elif case == "pickle_only":
        src, arch = request.getfixturevalue("pickle_only"), "llama"
    result = run("convert", arch, src, "--dst-path", dst, *extra)
    assert_one_line_error(result, expected)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_dst_exists(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("convert", "auto", tiny_checkpoint("qwen3"), "--dst-path", tmp_path / "out")
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "convert", "qwen3", tmp_path / "nowhere", "--dst-path", tmp_path / "out")
    assert result.exit_code != 0 and "no such file" in str(result.exception)


def test_convert_then_info(tiny_checkpoint, tmp_path):
    result = run("convert", "mistral", tiny_checkpoint("mistral"), "--dst-path", tmp_path / "e", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    info = run("info", tmp_path / "e", "--verify")
    assert info.exit_code == 0, info.output
    for fragment in ("mistral", "fp16", "verified (sha256)", "layers/layer_00001.safetensors", "sliding window"):
        assert fragment in info.output
    (tmp_path / "e" / "config.json").write_text("{}")
    assert_one_line_error(run("info", tmp_path / "e"), "config.json is truncated or altered")
    assert_one_line_error(run("info", tmp_path / "nope"), "no such engine directory")


@pytest.mark.parametrize("extra, expected", [(["--quant-lm-head"], "--quant-lm-head goes with --w4 or --w8")])
def test_random_convert_errors(extra, expected, tmp_path):
    result = run("convert", "qwen3", "--from-config", "qwen3-0.6b", "--random-weights", *extra,
                 "--dst-path", tmp_path / "e")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "e").exists()


def test_quantized_head_engine_is_format_3(tmp_path, monkeypatch):
    """A format-2 reader refuses it; export refuses it (AutoAWQ / compressed-tensors keep lm_head 16-bit)."""
    from lmconvert.convert import write_engine
    from lmconvert.engine import format as fmt, open_engine
    from lmconvert.errors import UserError
    from lmconvert.load.random_weights import RandomModel, config_from
    from lmconvert.runtime import LLMEngine

    cfg = config_from("qwen3-0.6b", "bf16")
    cfg.num_layers, cfg.vocab_size = 1, 512
    source = RandomModel(cfg, {"bits": 4, "group_size": 128, "quantize_lm_head": True})
    engine = write_engine(source, tmp_path / "e", False, "w4")
    assert open_engine(engine).config.lm_head_quantization == {"bits": 8, "group_size": None}
    result = run("export", engine, "--format", "compressed-tensors", "--dst-path", tmp_path / "x")
    assert_one_line_error(result, "has a quantized lm_head")
    assert not (tmp_path / "x").exists()
    broken = RandomModel(cfg, {"bits": 4, "group_size": 128, "quantize_lm_head": True})  # a config promising a head ...
    full = broken.global_tensors
    broken.global_tensors = lambda: {k: v for k, v in full().items() if not k.startswith("lm_head.")}  # ... unstored
    with pytest.raises(UserError, match="globals hold no lm_head.qweight"):
        LLMEngine(broken, device="cpu", num_cache_tokens=64)
    monkeypatch.setattr(fmt, "READ_VERSIONS", (1, 2))
    with pytest.raises(UserError, match="engine format 3 is not supported"):
        open_engine(engine)
