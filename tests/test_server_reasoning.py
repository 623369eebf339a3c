"""Reasoning split: the parser on engine deltas with tags cut anywhere, then end to end on a tiny qwen3 engine
whose chat template opens <think> (as QwQ's and Qwen3-Thinking's do) unless enable_thinking is false."""

from __future__ import annotations

import json

import httpx
import pytest

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.serve_reasoning import ReasoningStream, prompt_opens_think, split_reasoning
from lmconvert.runtime.server import create_app

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


def feed_all(deltas: list[str], starts_in_think: bool = False) -> tuple[str, str]:
    stream, reasoning, content = ReasoningStream(starts_in_think), [], []
    for i, delta in enumerate(deltas):
        r, c = stream.feed(delta, final=i == len(deltas) - 1)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("cut", range(1, 22))
def test_tags_split_at_every_position(cut):
    text = "<think>plan: a<b</think>Answer <th"
    assert feed_all([text[:cut], text[cut:]]) == ("plan: a<b", "Answer <th")


def test_whole_reply_and_open_prompt():
    assert split_reasoning("just an answer") == (None, "just an answer")
    assert split_reasoning("<think></think>answer") == (None, "answer")
    assert split_reasoning("<think>a</think>b<think>c</think>d") == ("ac", "bd")
    assert split_reasoning("still thinking</think>done", starts_in_think=True) == ("still thinking", "done")
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_think("no tags at all")


def test_parser_on_real_engine_deltas(tiny_engine):
    """The engine's own deltas with the tags spliced in mid-token: reasoning and answer come out intact."""
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu")
    deltas = [o.delta for o in engine.stream("Hello, how are you", SamplingParams(max_tokens=12, temperature=0))]
    deltas = [d for d in deltas if d]
    assert len(deltas) >= 4
    half = len(deltas) // 2
    spliced = ["<th", "ink>"] + deltas[:half] + ["</thi", "nk>"] + deltas[half:]
    assert feed_all(spliced) == ("".join(deltas[:half]), "".join(deltas[half:]))


@pytest.fixture(scope="module")
def think_server(tiny_engine):
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu")
    engine.tokenizer.chat_template = THINK_TEMPLATE
    greedy = SamplingParams(max_tokens=10, temperature=0)
    expected = {}
    for thinking in (True, False):  # what the model writes after each prompt, run directly on the engine
        text = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False,
                                                    enable_thinking=thinking)
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        expected[thinking] = engine.generate([ids], greedy)[0].text
    with BackgroundServer(create_app(engine, "tiny-qwen3", reasoning_parser="qwen3")) as server:
        yield server.url, expected


def chat(url: str, **extra) -> httpx.Response:
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 10, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_open_think_goes_to_reasoning_content(think_server):
    url, expected = think_server
    assert expected[True]  # the model wrote something, all of it inside the open <think>
    message = chat(url).json()["choices"][0]["message"]
    assert message["reasoning_content"] == expected[True]
    assert message["content"] == ""


def test_enable_thinking_false_answers_in_content(think_server):
    url, expected = think_server
    message = chat(url, chat_template_kwargs={"enable_thinking": False}).json()["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"] == expected[False]


def test_streamed_reasoning_matches(think_server):
    url, expected = think_server
    reasoning, content = [], []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
            "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                reasoning.append(delta.get("reasoning_content", ""))
                content.append(delta.get("content", ""))
    assert "".join(reasoning) == expected[True]
    assert "".join(content) == ""
