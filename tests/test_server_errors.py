"""What the server answers to bad input: 401 / 400 / 404 / 413 in OpenAI's error shape, never a traceback."""

from __future__ import annotations

import json

import httpx
import pytest

from lmconvert.runtime import LLMEngine
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.server import create_app

KEY = "sk-test-123"
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_engine):
    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", session_len=256)
    app = create_app(engine, "tiny-llama", api_keys=("other-key", KEY), max_body_bytes=64 * 1024)
    with BackgroundServer(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            yield client


def assert_error(response: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "File \"" not in response.text
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(server, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
        # a malformed body must not get past the key check
        response = httpx.request(method, f"{server.base_url}{path}", headers=headers, content=b"{bad json")
        assert_error(response, 401, "API key")
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_right_key_works_and_probes_need_none(server):
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
    assert server.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert "lmconvert_kv_blocks_used" in httpx.get(f"{server.base_url}/metrics").text


@pytest.mark.parametrize("body, param", [
    ({"messages": "Hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": 5}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "n": 1000}, "n"),
    ({**CHAT, "stop": 7}, "stop"),
    ({**CHAT, "stream_options": "yes"}, "stream_options"),
    # found by fuzzing (benchmarks/fuzz_http.py): integers past what the sampler's tensors hold were a 500
    ({**CHAT, "top_k": 2**70}, "top_k"),
    ({**CHAT, "seed": 2**70}, "seed"),
    ({**CHAT, "seed": -(2**64)}, "seed"),
])
def test_wrong_types_and_ranges_are_400(server, body, param):
    assert_error(server.post("/v1/chat/completions", json=body), 400, param=param)


@pytest.mark.parametrize("field, literal", [("temperature", "NaN"), ("repetition_penalty", "Infinity"),
                                            ("top_p", "-Infinity")])
def test_non_finite_numbers_are_400(server, field, literal):
    """Python's json reads NaN / Infinity, which JSON itself does not have; an infinite penalty broke sampling."""
    content = json.dumps(CHAT)[:-1] + f', "{field}": {literal}}}'
    response = server.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert_error(response, 400, param=field)


def test_extreme_but_valid_seed_and_top_k_work(server):
    for extra in ({"seed": 2**64 - 9, "n": 2}, {"seed": -(2**63)}, {"top_k": 2**31 - 1, "temperature": 1}):
        assert server.post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200, extra


@pytest.mark.parametrize("content", [b"{bad json", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe"])
def test_malformed_bodies_are_400(server, content):
    response = server.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert_error(response, 400, "JSON")


def test_session_length_overflow_is_400(server):
    assert_error(server.post("/v1/chat/completions", json={**CHAT, "max_tokens": 250}), 400, "session length", "250")
    assert_error(server.post("/v1/completions", json={"prompt": "fox " * 400, "max_tokens": 1}), 400,
                 "session length")
    # within the limit, with no max_tokens given, the answer may use the rest of the session
    assert server.post("/v1/completions", json={"prompt": "fox", "max_tokens": 200, "temperature": 0}).status_code == 200


def test_bad_prompts_are_400(server):
    assert_error(server.post("/v1/completions", json={"prompt": [], "max_tokens": 2}), 400, "empty")
    assert_error(server.post("/v1/completions", json={"prompt": [5, 99999], "max_tokens": 2}), 400, "token ids")
    assert_error(server.post("/v1/completions", json={"prompt": [[5, 6], [-1]], "max_tokens": 2}), 400, "token ids")
    assert_error(server.post("/v1/completions", json={"prompt": "x", "echo": True}), 400, "echo", param="echo")
    assert_error(server.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400, "needs logprobs")
    assert_error(server.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21}), 400,
                 param="top_logprobs")
    assert_error(server.post("/v1/completions", json={"prompt": "x", "logprobs": -1}), 400, param="logprobs")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert_error(server.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400, "tools", param="tools")
    for bad in ({"type": "json_schema"}, {"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": 5}}):
        response = server.post("/v1/chat/completions", json={**CHAT, "response_format": bad})
        assert_error(response, 400)
        assert response.json()["error"]["param"].startswith("response_format"), bad
    for allowed in ({"tools": tools, "tool_choice": "none"}, {"tools": []}, {"response_format": {"type": "text"}}):
        assert server.post("/v1/chat/completions", json={**CHAT, **allowed}).status_code == 200, allowed
    constrained = server.post("/v1/chat/completions", json={**CHAT, "max_tokens": 32,
                                                            "response_format": {"type": "json_object"}})
    assert constrained.status_code == 200  # served now (structured outputs): even the tiny random model's
    message = constrained.json()["choices"][0]  # answer is JSON, or a prefix of JSON cut at max_tokens
    if message["finish_reason"] == "stop":
        json.loads(message["message"]["content"])
    assert_error(server.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": ["x"]}), 400,
                 param="chat_template_kwargs")
    assert_error(server.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "gpt-4", param="model")


def test_body_over_limit_is_413(server):
    response = server.post("/v1/completions", json={"prompt": "x" * 100_000, "max_tokens": 1})
    assert_error(response, 413, "bytes")


def test_unknown_route_and_method(server):
    assert_error(server.get("/v1/nothing"), 404)
    assert_error(server.get("/v1/chat/completions"), 405)


def test_server_still_serves_after_errors(server):
    reply = server.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 3, "temperature": 0}).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3


def test_api_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared with secrets.compare_digest, whatever the token, so neither the time
    taken nor an early exit tells which key (or prefix) was close."""
    import secrets

    from lmconvert.runtime.server import RequestGate

    calls = []
    real = secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    gate = RequestGate(None, ("k-one", "k-two", "k-three"), 1024)
    for header, allowed in ((b"Bearer k-one", True), (b"Bearer k-three", True), (b"Bearer k-tw", False),
                            (b"Basic k-two", False)):
        calls.clear()
        assert gate._authorized({"headers": [(b"authorization", header)]}) is allowed
        assert [key for _, key in calls] == [b"k-one", b"k-two", b"k-three"]
