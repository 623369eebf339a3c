"""Sampling fields travel from the request to the engine intact: each reply equals the engine run directly with
the SamplingParams the fields stand for (seeded, so sampled runs are reproducible)."""

from __future__ import annotations

import json

import httpx
import pytest

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.server import create_app

PROMPT = "Hello, how are you today?"
SAMPLED = {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.3, "presence_penalty": 0.5,
           "frequency_penalty": 0.4}


@pytest.fixture(scope="module")
def served(tiny_engine):
    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", session_len=256)

    def direct(prompt=PROMPT, **params):  # computed before the server owns the engine
        return engine.generate([prompt], SamplingParams(**params))[0]

    chat_ids = engine.apply_chat_template([{"role": "user", "content": PROMPT}])
    expected = {
        "choices": [direct(max_tokens=12, seed=7 + i, **SAMPLED).text for i in range(3)],
        "chat": [direct(chat_ids, max_tokens=5, seed=3 + i, **SAMPLED).text for i in range(2)],
        "greedy": direct(max_tokens=12, temperature=0),
    }
    with BackgroundServer(create_app(engine, "tiny")) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield client, expected


def test_n_seeded_choices_match_the_engine(served):
    client, expected = served
    reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "n": 3, "seed": 7, **SAMPLED})
    texts = [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]
    assert texts == expected["choices"]
    assert len(set(texts)) > 1  # n choices are not n copies
    assert reply.json()["usage"]["completion_tokens"] == 36


def test_stop_strings_cut_the_text(served):
    client, expected = served
    greedy = expected["greedy"]
    assert len(greedy.text) > 6
    stop = greedy.text[3:6]
    for stop_field in (stop, ["never-there", stop]):
        reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                     "stop": stop_field}).json()
        choice = reply["choices"][0]
        assert choice["text"] == greedy.text[:greedy.text.find(stop)] and choice["finish_reason"] == "stop"


def test_top_k_minus_one_means_off(served):
    client, expected = served
    reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "top_k": -1})
    assert reply.json()["choices"][0]["text"] == expected["greedy"].text


def test_n_streamed_choices_are_indexed(served):
    client, expected = served
    texts: dict[int, str] = {}
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "n": 2, "seed": 3, "stream": True,
            **SAMPLED}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert [texts[0], texts[1]] == expected["chat"]
