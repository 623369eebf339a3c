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
        "unsupported_arch": "supported: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe",
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


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCONVERT_DEBUG", "0")  # restored after the test: --debug sets it for child processes
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


# ---- issue #24: first contact --------------------------------------------------------------------------

def test_internal_errors_are_one_line_too(tiny_engine, monkeypatch):
    """An exception that is not the user's doing still ends in one line, naming its type and --debug."""
    from lmconvert.runtime import engine as engine_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(engine_module.LLMEngine, "__init__", broken)
    result = run("generate", tiny_engine("llama"), "--prompt", "hi", "--device", "cpu")
    assert_one_line_error(result, "ZeroDivisionError: division by zero", "lmconvert --debug")


@pytest.mark.skipif(__import__("torch").backends.cuda.is_built(), reason="needs a CPU-only torch build")
def test_cuda_on_a_cpu_only_torch_is_one_line(tiny_engine):
    result = run("generate", tiny_engine("llama"), "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(result, "--device cuda: this torch", "CPU-only build")


@pytest.mark.parametrize("args, bad", [
    (["generate", "MODEL", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["quantize", "--w4", "MODEL", "--dst-path", "OUT", "--group-size", "0"], "--group-size"),
    (["quantize", "--w8", "MODEL", "--dst-path", "OUT", "--group-size", "0"], "--group-size"),
    (["convert", "qwen3", "--from-config", "qwen3-0.6b", "--random-weights", "--w4", "--group-size", "0",
      "--dst-path", "OUT"], "--group-size"),
    (["chat", "MODEL", "--top-p", "1.5"], "--top-p"),
    (["serve", "MODEL", "--max-batch-size", "0"], "--max-batch-size"),
])
def test_bad_option_values_are_refused_where_they_are_parsed(args, bad, tmp_path):
    """A usage error (exit 2) naming the option, before any model is opened: MODEL does not even exist."""
    args = [str(tmp_path / "missing") if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = run(*args)
    assert result.exit_code == 2 and f"Invalid value for '{bad}'" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_engine_config_is_validated_on_load(tmp_path):
    """A hand-edited config.json (group_size 0) is refused by info --verify and generate alike, in one line."""
    import json

    from lmconvert.engine import format as fmt

    engine = run("convert", "qwen3", "--from-config", "qwen3-0.6b", "--random-weights", "--w4", "--dst-path",
                 tmp_path / "e")
    assert engine.exit_code == 0, engine.output
    config = tmp_path / "e" / "config.json"
    data = json.loads(config.read_text())
    assert data["quantization"]["group_size"] == 128  # the largest that divides every linear of qwen3-0.6b
    data["quantization"]["group_size"] = 0
    config.write_text(json.dumps(data))
    # the manifest would catch the edit first; make it agree, as a careful hand-editor would
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    manifest["files"]["config.json"] = {"size": config.stat().st_size, "sha256": fmt.sha256_file(config)}
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    for args in (["info", tmp_path / "e", "--verify"], ["generate", tmp_path / "e", "--prompt", "hi", "--device", "cpu"]):
        assert_one_line_error(run(*args), "quantization.group_size must be a positive integer or null, got 0")
    data["quantization"] = {**data["quantization"], "group_size": 128, "lm_head": True}  # a flag, not a block
    config.write_text(json.dumps(data))
    manifest["files"]["config.json"] = {"size": config.stat().st_size, "sha256": fmt.sha256_file(config)}
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run("info", tmp_path / "e"), "quantization.lm_head must be an object, got True")


def test_random_w8_defaults_to_one_scale_per_channel(tmp_path):
    import json

    result = run("convert", "qwen3", "--from-config", "qwen3-0.6b", "--random-weights", "--w8", "--dst-path",
                 tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "config.json").read_text())["quantization"]["group_size"] is None


def test_sigterm_during_convert_leaves_nothing_and_stale_temp_dirs_are_cleared(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    stale = tmp_path / f".e.tmp-{socket.gethostname()}-999999999-abcd1234"  # a dead run's (no such pid)
    stale.mkdir()
    live = tmp_path / f".e.tmp-{socket.gethostname()}-{os.getpid()}-abcd1234"  # a running one's: kept
    live.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lmconvert.cli", "convert", "qwen3", "--from-config", "qwen3-8b",
                             "--random-weights", "--w4", "--dst-path", str(tmp_path / "e")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name not in (stale.name, live.name) for p in tmp_path.glob(".e.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    assert not stale.exists()  # cleared when the new run started
    time.sleep(1)  # well inside the write of a 5 GB engine
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_help_version_and_bare_command():
    from lmconvert.presets import PRESETS

    bare = run()
    assert bare.exit_code == 0 and "Commands:" in bare.output
    version = run("--version")
    assert version.exit_code == 0 and version.output.startswith("lmconvert ")
    chat = run("chat", "--help").output
    for option in ("--top-p", "--top-k", "--repetition-penalty", "--seed", "--max-new-tokens"):
        line = next(line for line in chat.splitlines() if line.strip().startswith(option))
        assert len(line.split()) > 2, f"{option} has no help text: {line!r}"
    convert = " ".join(run("convert", "--help").output.split())
    assert "[default: 128]" not in convert and "--w8 default one scale per output channel" in convert
    assert all(name in convert for name in PRESETS)
    eval_help = run("eval", "--help").output
    assert "--device" in eval_help and "--max-batch-size" not in eval_help and "--cache-max-entry-count" not in eval_help
