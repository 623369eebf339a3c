"""Concurrency: 200 simultaneous streams all complete, well formed, each with the output its prompt gives when run
alone; clients that hang up mid-way get their sequences aborted and their KV blocks freed."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.serve_client import run_load
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.server import create_app

from tiny_models import SENTENCES

PROMPTS = [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(20)]
MAX_TOKENS = 8


def body(i: int) -> tuple[str, dict]:
    """Request i: even ones through /v1/completions, odd ones through /v1/chat/completions."""
    prompt, common = PROMPTS[i % len(PROMPTS)], {"max_tokens": MAX_TOKENS, "temperature": 0,
                                                 "stream_options": {"include_usage": True}}
    if i % 2 == 0:
        return "/v1/completions", {"prompt": prompt, **common}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **common}


@pytest.fixture(scope="module")
def served(tiny_engine):
    # cache for every sequence of the batch at once: no preemption, so recomputation cannot perturb the check
    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", session_len=512, num_cache_tokens=8192)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    alone = {}
    for prompt in PROMPTS:
        chat_ids = engine.apply_chat_template([{"role": "user", "content": prompt}])
        alone["/v1/completions", prompt] = engine.generate([prompt], greedy)[0]
        alone["/v1/chat/completions", prompt] = engine.generate([chat_ids], greedy)[0]
    with BackgroundServer(create_app(engine, "tiny-llama")) as server:
        yield server.url, engine, alone


def wait_until(condition, limit_s: float = 60.0) -> bool:
    """Polls a condition a bounded number of times (not a timing assertion: the limit is only a safety net)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_200_concurrent_streams_complete_uncrossed(served):
    url, engine, alone = served
    assert len({out.text for out in alone.values()}) >= 10  # distinct answers, so a crossed stream would show
    requests = [body(i) for i in range(200)]
    by_path: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(requests):
        by_path.setdefault(path, []).append(i)

    async def fire():  # both endpoints at once, 100 streams each
        return await asyncio.gather(*(run_load(url, path, [requests[i][1] for i in idx], concurrency=len(idx),
                                               timeout_s=300) for path, idx in by_path.items()))

    results = {}
    for (path, idx), outs in zip(by_path.items(), asyncio.run(fire())):
        results.update(zip(idx, outs))
    assert len(results) == 200
    for i, (path, request) in enumerate(requests):
        result = results[i]
        prompt = request.get("prompt") or request["messages"][0]["content"]
        expected = alone[path, prompt]
        assert result.problems == [], (i, result.problems)
        assert result.text.get(0, "") == expected.text, (i, path, prompt)
        assert result.finish_reason == {0: expected.finish_reason}
        assert result.usage["completion_tokens"] == len(expected.token_ids)
        assert result.usage["prompt_tokens"] == expected.prompt_tokens
    assert wait_until(lambda: engine.block_manager.num_used == 0)


def aborted(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(r'lmconvert_requests_finished_total\{[^}]*finish_reason="abort"\} (\d+)', text)
    return int(found.group(1)) if found else 0


def test_dropped_streams_free_their_blocks_at_once(served):
    url, engine, _ = served
    long = {"max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    before = aborted(url)

    async def open_then_drop() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def open_one(i: int):
                stream = client.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": PROMPTS[i]}], **long})
                response = await stream.__aenter__()
                seen = 0
                async for line in response.aiter_lines():  # read two chunks, then stop reading
                    seen += line.startswith("data: {")
                    if seen == 2:
                        break
                return stream

            streams = await asyncio.gather(*(open_one(i) for i in range(20)))
            in_use = engine.block_manager.num_used
            for stream in streams:  # hang up mid-way
                await stream.__aexit__(None, None, None)
            return in_use

    assert asyncio.run(open_then_drop()) > 0
    assert wait_until(lambda: engine.block_manager.num_used == 0 and not engine.scheduler.running)
    assert aborted(url) - before == 20  # aborted, not run to their 400 tokens


def test_dropped_plain_request_is_aborted(served):
    url, engine, _ = served
    before = aborted(url)

    async def start_then_cancel():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            task = asyncio.create_task(client.post("/v1/completions", json={
                "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "temperature": 0}))
            while not engine.scheduler.running and not task.done():
                await asyncio.sleep(0.02)
            task.cancel()  # closes the connection while the server is still generating

    asyncio.run(asyncio.wait_for(start_then_cancel(), 120))
    assert wait_until(lambda: engine.block_manager.num_used == 0 and not engine.scheduler.running)
    assert aborted(url) - before == 1
