"""`lmconvert quantize` / `lmconvert eval`: every bad input is one `error:` line, exit 1, nothing written."""

from __future__ import annotations

import json

import pytest

from cli_helpers import assert_one_line_error, run
from tiny_models import SENTENCES


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "good.txt").write_text("\n".join(SENTENCES * 6))
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text(SENTENCES[0])
    (d / "data.csv").write_text("a,b\n1,2\n")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    (d / "nothing").mkdir()
    return d


@pytest.fixture(scope="module")
def w8_engine(tiny_engine, tmp_path_factory):
    dst = tmp_path_factory.mktemp("w8") / "engine"
    assert run("quantize", tiny_engine("llama"), "--w8", "--dst-path", dst).exit_code == 0
    return dst


CASES = {
    "both_bits": (["--w4", "--w8"], "exactly one of --w4, --w8 and --w8a8"),
    "no_bits": ([], "exactly one of --w4, --w8 and --w8a8"),
    "w8a8_and_w4": (["--w8a8", "--w4"], "exactly one of --w4, --w8 and --w8a8"),
    "smooth_quant_and_w8": (["--smooth-quant", "--w8"], "exactly one of --w4, --w8 and --w8a8"),
    "alpha_without_w8a8": (["--w8", "--alpha", "0.5"], "--alpha is the smoothing strength of --w8a8"),
    "alpha_out_of_range": (["--w8a8", "--alpha", "1.5"], "--alpha must lie in [0, 1], got 1.5"),
    "w8a8_groups": (["--w8a8", "--group-size", "32"], "one weight scale per output channel"),
    "w8a8_head": (["--w8a8", "--quant-lm-head"], "W8A8 keeps lm_head in 16 bits"),
    "group_not_dividing": (["--w4", "--group-size", "128"], "use --group-size 64"),
    "group_unsupported": (["--w4", "--group-size", "48"], "W4 supports 128, 64, 32"),
    "empty_calib": (["--w4", "--group-size", "32", "--calib-data", "{d}/empty.txt"], "fewer than --calib-samples"),
    "short_calib": (["--w4", "--group-size", "32", "--calib-data", "{d}/short.txt"], "fewer than --calib-samples"),
    "unknown_type": (["--w4", "--group-size", "32", "--calib-data", "{d}/data.csv"], "unknown calibration file type"),
    "bad_jsonl": (["--w4", "--group-size", "32", "--calib-data", "{d}/bad.jsonl"], 'expected an object with a "text"'),
    "empty_dir": (["--w4", "--group-size", "32", "--calib-data", "{d}/nothing"], "no .txt or .jsonl"),
    "missing_calib": (["--w4", "--group-size", "32", "--calib-data", "{d}/absent.txt"], "does not exist"),
}


@pytest.mark.parametrize("case", CASES)
def test_quantize_errors(case, tiny_engine, texts, tmp_path):
    flags, fragment = CASES[case]
    dst = tmp_path / "out"
    result = run("quantize", tiny_engine("llama"), *[f.format(d=texts) for f in flags], "--calib-samples", 4,
                 "--calib-seqlen", 32, "--dst-path", dst)
    assert_one_line_error(result, fragment)
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_already_quantized_source(w8_engine, tmp_path):
    result = run("quantize", w8_engine, "--w4", "--group-size", "32", "--dst-path", tmp_path / "out")
    assert_one_line_error(result, "already quantized")
    assert not (tmp_path / "out").exists()


def test_quantize_then_eval_json(tiny_engine, texts, tmp_path):
    dst = tmp_path / "w4"
    result = run("quantize", tiny_engine("qwen3"), "--w4", "--group-size", "32", "--calib-data", texts / "good.txt",
                 "--calib-samples", 4, "--calib-seqlen", 32, "--dst-path", dst)
    assert result.exit_code == 0, result.output
    assert "compression" in result.output or "smaller" in result.output
    out = run("eval", dst, "--text", texts / "good.txt", "--seq-len", 32, "--windows", 2, "--json")
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output.strip().splitlines()[-1])
    assert set(figures) == {"ppl", "tokens", "seconds"} and figures["tokens"] == 62 and figures["ppl"] > 1


def test_quantize_lm_head_then_generate(tiny_engine, tmp_path):
    dst = tmp_path / "w8h"
    result = run("quantize", tiny_engine("qwen2"), "--w8", "--quant-lm-head", "--dst-path", dst)
    assert result.exit_code == 0, result.output
    config = json.loads((dst / "config.json").read_text())
    assert config["format_version"] == 3 and config["quantization"]["modules_not_converted"] == []
    out = run("generate", dst, "--prompt", "hello", "--max-new-tokens", 4, "--temperature", 0)
    assert out.exit_code == 0 and out.output.strip(), out.output


@pytest.mark.parametrize("name,fragment", [("absent.txt", "no such text file"), ("empty.txt", "is empty"),
                                           ("short.txt", "fewer than one window")])
def test_eval_errors(name, fragment, tiny_engine, texts):
    assert_one_line_error(run("eval", tiny_engine("llama"), "--text", texts / name, "--seq-len", 64), fragment)
