"""What a newcomer meets first (issue #24): defaults that fit the shipped model, progress in pipes and logs,
bench sized for the device, and a chat REPL that behaves like the others."""

from __future__ import annotations

import json
import os
import signal

from click.testing import CliRunner

from cli_helpers import run
from lmconvert.cli import main
from lmconvert.progress import LogLines


def test_quantize_w4_picks_the_largest_group_size_that_fits(tiny_engine, tmp_path):
    """The tiny model's hidden size 64 takes no group of 128: the default is then 64, and the summary says so."""
    result = run("quantize", "--w4", tiny_engine("qwen3"), "--dst-path", tmp_path / "w4")
    assert result.exit_code == 0, result.output
    assert "awq W4 g64 engine written to" in result.output
    assert json.loads((tmp_path / "w4" / "config.json").read_text())["quantization"]["group_size"] == 64


def test_progress_in_a_pipe_is_plain_lines(capsys):
    bar = LogLines(every_s=0)
    with bar:
        task = bar.add_task("quantizing", total=4, loss="")
        for i in range(4):
            bar.update(task, advance=1, loss=f"layer {i} error 0.{i}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("quantizing: 1/4 (25%), 00:00:0") and lines[0].endswith("layer 0 error 0.0")
    assert lines[-1].startswith("quantizing: 4/4 (100%)") and len(lines) == 4


def test_convert_through_a_pipe_reports_progress(tiny_checkpoint, tmp_path, monkeypatch):
    import lmconvert.progress

    quick = run("convert", "llama", tiny_checkpoint("llama"), "--dst-path", tmp_path / "quick")
    assert quick.exit_code == 0 and quick.stderr == ""  # work shorter than a log interval leaves no line
    monkeypatch.setattr(lmconvert.progress, "LOG_EVERY_S", 0.0)  # as if every layer took long
    result = run("convert", "llama", tiny_checkpoint("llama"), "--dst-path", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "1/3 (33%)" in result.stderr and "3/3 (100%)" in result.stderr  # globals + 2 layers
    assert "MiB written" in result.stderr


def test_bench_defaults_fit_the_cpu_and_say_what_runs(tiny_engine):
    result = run("bench", tiny_engine("llama"), "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("bench latency: 1 request(s) of 128 tokens in / 64 out")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["input_len"], figures["output_len"], figures["num_prompts"]) == (128, 64, 1)


def test_chat_help_and_a_reply_cut_by_max_new_tokens(tiny_engine):
    result = CliRunner().invoke(main, ["chat", str(tiny_engine("llama")), "--device", "cpu", "--temperature", "0",
                                       "--max-new-tokens", "3"], input="/help\nhello\n/exit\nnever asked\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("/help shows this")  # the command, not a prompt to the model
    assert "(reply cut at 3 tokens: --max-new-tokens)" in result.stderr


def test_ctrl_c_stops_the_reply_not_the_session(tiny_engine):
    from lmconvert.runtime import LLMEngine, SamplingParams
    from lmconvert.runtime.chat import ChatSession

    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", num_cache_tokens=256)
    session = ChatSession(engine, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), None, None)
    real_stream = engine.stream

    def interrupted_stream(ids, params):
        for i, out in enumerate(real_stream(ids, params)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the reply streams
            yield out

    engine.stream = interrupted_stream
    session.ask("hello", interactive=False)
    assert session.messages == [] and not engine.has_unfinished()  # the reply was aborted and not kept
    engine.stream = real_stream
    session.ask("hello", interactive=False)  # the session goes on
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_chat_samples_like_llama_cpp_unless_the_model_says_otherwise():
    """A GGUF conversion's generation config names no sampling: chat then uses llama.cpp's defaults, not
    temperature 1 over the whole vocabulary (SmolLM2 W4 wandered off into noise with it)."""
    from types import SimpleNamespace

    from lmconvert.cli_options import build_sampling

    opts = {"max_new_tokens": 8, "seed": None, "stop": (), "temperature": None, "top_p": None, "top_k": None,
            "repetition_penalty": None}
    bare = build_sampling(SimpleNamespace(generation_config={"eos_token_id": [2]}), opts)
    assert (bare.temperature, bare.top_p, bare.top_k) == (0.8, 0.95, 40)
    qwen = build_sampling(SimpleNamespace(generation_config={"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                              "top_k": 20}), opts)
    assert (qwen.temperature, qwen.top_p, qwen.top_k) == (0.6, 0.95, 20)
    greedy = build_sampling(SimpleNamespace(generation_config={"do_sample": False}), opts)
    assert greedy.temperature == 0.0
    mine = build_sampling(SimpleNamespace(generation_config={}), {**opts, "temperature": 0.0, "top_k": 5})
    assert (mine.temperature, mine.top_k) == (0.0, 5)


def test_a_cpu_host_loads_no_triton():
    """Triton's kernels need CUDA (or the interpreter); importing it anyway cost a CPU chat 71 MB of RSS."""
    import subprocess
    import sys

    code = ("import sys, torch, lmconvert.runtime, lmconvert.quant\n"
            "print(torch.cuda.is_available(), 'triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cuda, triton_loaded = done.stdout.split()
    assert triton_loaded == ("True" if cuda == "True" else "False")


def test_a_quantized_engine_leaves_no_layer_file_mapped(tiny_engine, tmp_path):
    """CPU: a W4 engine's linears are repacked at load, so nothing of a layer file is needed after it; its norm
    weights, kept as views, held every layer file's pages resident (63 MB of a 0.48 GB SmolLM2 W4 chat). An fp
    engine's weights are used in place: its layer files stay mapped, not copied."""
    from lmconvert.quant import QuantConfig, quantize
    from lmconvert.runtime import LLMEngine

    def mapped_layer_files(engine_dir) -> set[str]:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if f"{engine_dir}/layers/" in line}

    fp = tiny_engine("qwen3")
    w4 = quantize(str(fp), str(tmp_path / "w4"), QuantConfig(bits=4, group_size=32, search_scale=False,
                                                              clip=False)).path
    engines = [LLMEngine(str(path), device="cpu", num_cache_tokens=256) for path in (fp, w4)]
    ids = list(range(10, 30))
    assert engines[1].logits(ids).isfinite().all()  # norms copied, not lost
    assert len(mapped_layer_files(fp)) == engines[0].config.num_layers
    assert mapped_layer_files(w4) == set()
