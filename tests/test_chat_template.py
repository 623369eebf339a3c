"""--chat-template (issue #25, part 4): a file or the shipped chatml-tools template replaces the model's own, in
chat / generate / serve and, with convert, inside the engine."""

from __future__ import annotations

from cli_helpers import assert_one_line_error, run
from lmconvert.engine import open_engine
from lmconvert.templates import read_chat_template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_shipped_template_renders_tools_calls_and_results(tiny_engine):
    tokenizer = open_engine(tiny_engine("qwen3")).load_tokenizer()
    tokenizer.chat_template = read_chat_template("chatml-tools")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<tools>\n{"name": "get_weather", "description": "Weather of a city", "parameters":' in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"celsius": 21}\n</tool_response>\n<tool_response>\nsunny\n'
        "</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_convert_stores_the_template_in_the_engine(tiny_checkpoint, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]")
    result = run("convert", "qwen3", tiny_checkpoint("qwen3"), "--dst-path", tmp_path / "e", "--chat-template", template)
    assert result.exit_code == 0, result.output
    tokenizer = open_engine(tmp_path / "e").load_tokenizer()
    assert tokenizer.chat_template == template.read_text()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n[assistant]"


def test_generate_takes_the_template_for_this_run_only(tiny_engine, tmp_path):
    """--chat-template on generate changes the prompt the model sees (so its greedy answer), not the engine."""
    engine = tiny_engine("qwen3")
    args = ["generate", engine, "--prompt", "hi", "--chat", "--temperature", "0", "--max-new-tokens", "8",
            "--device", "cpu"]
    own, shipped = run(*args), run(*args, "--chat-template", "chatml-tools")
    assert own.exit_code == 0 and shipped.exit_code == 0, own.output + shipped.output
    from lmconvert.runtime import LLMEngine, SamplingParams

    replaced = LLMEngine(str(engine), device="cpu", num_cache_tokens=256, chat_template=read_chat_template("chatml-tools"))
    ids = replaced.apply_chat_template([{"role": "user", "content": "hi"}])
    assert replaced.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    expected = replaced.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].text
    assert shipped.stdout == expected + "\n"
    assert open_engine(engine).load_tokenizer().chat_template != read_chat_template("chatml-tools")


def test_bad_templates_are_one_line(tiny_engine, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    engine = tiny_engine("qwen3")
    assert_one_line_error(run("generate", engine, "--prompt", "hi", "--chat-template", tmp_path / "nope.jinja"),
                          "no such file (or a shipped name: chatml-tools)")
    assert_one_line_error(run("chat", engine, "--chat-template", broken), "broken.jinja: line 1:")
