"""A checking SSE client for the server: streams requests concurrently and records every way a stream is not
in OpenAI's shape. Used by the load test and benchmarks/server_load.py (needs httpx, a test dependency)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class StreamResult:
    text: dict[int, str] = field(default_factory=dict)  # choice index -> joined text (content for chat)
    finish_reason: dict[int, str] = field(default_factory=dict)
    usage: dict | None = None
    chunks: int = 0
    problems: list[str] = field(default_factory=list)  # empty for a well-formed stream
    status: int | None = None  # the HTTP status (None: no response)
    retry_after: str | None = None  # a refusal's Retry-After header
    errors: list[dict] = field(default_factory=list)  # error events inside the stream
    latency_s: float = 0.0
    first_token_s: float | None = None


def _check_chunk(chunk: dict, result: StreamResult, first: dict, include_usage: bool) -> None:
    frame = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
    if not first:
        first.update(frame)
    elif frame != first:
        result.problems.append(f"chunk frame {frame} differs from the first {first}")
    if first["object"] not in ("chat.completion.chunk", "text_completion"):
        result.problems.append(f"object is {first['object']!r}")
    if include_usage != ("usage" in chunk):
        result.problems.append("usage key present without include_usage, or missing with it")
    if chunk.get("usage") is not None:
        if chunk["choices"] or result.usage is not None:
            result.problems.append("usage sent on a chunk with choices, or twice")
        result.usage = chunk["usage"]
        return
    for choice in chunk.get("choices", []):
        index = choice["index"]
        if index in result.finish_reason:
            result.problems.append(f"choice {index} continued after its finish_reason")
        piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
        if piece:
            result.text[index] = result.text.get(index, "") + piece
            if result.first_token_s is None:
                result.first_token_s = time.monotonic()
        if choice.get("finish_reason") is not None:
            result.finish_reason[index] = choice["finish_reason"]


async def stream_request(client: httpx.AsyncClient, path: str, body: dict) -> StreamResult:
    """POSTs body with stream=True and checks every event; problems are recorded, not raised."""
    result, first, start = StreamResult(), {}, time.monotonic()
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    done = False
    try:
        async with client.stream("POST", path, json={**body, "stream": True}) as response:
            result.status, result.retry_after = response.status_code, response.headers.get("retry-after")
            if response.status_code != 200 or not response.headers["content-type"].startswith("text/event-stream"):
                result.problems.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return result
            async for line in response.aiter_lines():
                if not line:
                    continue
                if done or not line.startswith("data: "):
                    result.problems.append(f"unexpected line {line[:80]!r}" + (" after [DONE]" if done else ""))
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.errors.append(chunk["error"])
                    result.problems.append(f"error event: {chunk['error'].get('message')}")
                    continue
                result.chunks += 1
                _check_chunk(chunk, result, first, include_usage)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        result.problems.append(f"{type(e).__name__}: {e}")
    if not done:
        result.problems.append("stream did not end with data: [DONE]")
    if include_usage and result.usage is None:
        result.problems.append("no usage chunk")
    result.first_token_s = None if result.first_token_s is None else result.first_token_s - start
    result.latency_s = time.monotonic() - start
    return result


async def run_load(base_url: str, path: str, bodies: list[dict], concurrency: int, headers: dict | None = None,
                   timeout_s: float = 600.0) -> list[StreamResult]:
    """Streams every body with at most `concurrency` in flight; results in the order of bodies."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout_s) as client:
        async def one(body: dict) -> StreamResult:
            async with gate:
                return await stream_request(client, path, body)

        return await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), timeout_s)
