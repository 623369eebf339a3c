"""A checking SSE client for the server: streams requests concurrently and records every way a stream is not
in OpenAI's shape; plus what tests, benchmarks and deploy/ share to start a `serve` process, wait for it and
read its /metrics. Needs httpx (a test dependency)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

DONE = "[DONE]"


def sse_event(line: str) -> dict | str | None:
    """One line of an OpenAI event stream: None for a blank line, DONE for the end marker, else the event's JSON.
    Raises ValueError on a line that is not `data: ...`."""
    if not line:
        return None
    if not line.startswith("data: "):
        raise ValueError(f"unexpected line {line[:80]!r}")
    data = line[len("data: "):]
    return DONE if data == DONE else json.loads(data)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, labels: str = "") -> float:
    """The first sample of `name` whose labels contain `labels` (e.g. 'reason="queue_full"')."""
    for key, value in samples.items():
        if (key == name or key.startswith(name + "{")) and labels in key:
            return value
    raise KeyError(f"no metric {name} {labels}".rstrip())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(url: str) -> int | None:
    """/health's status code, or None while nothing answers."""
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.TransportError:
        return None


def spawn_server(model: str, *args: str, host: str = "127.0.0.1", port: int | None = None, env: dict | None = None,
                 output=subprocess.PIPE) -> tuple[subprocess.Popen, str]:
    """`lmconvert serve MODEL` as its own process (stdout and stderr together, as text); returns it with a base URL
    on 127.0.0.1. Does not wait: see wait_healthy."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmconvert.cli", "serve", model, "--server-name", host,
                             "--server-port", str(port), *args], stdout=output, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 120.0) -> bool:
    """Polls /health until 200 (True); False if the process exits first or time runs out. Only 503 (loading) or
    no answer are allowed on the way."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        status = health(url)
        if status == 200:
            return True
        if status not in (None, 503):
            raise AssertionError(f"/health answered {status} while starting")
        time.sleep(0.1)
    return False


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
                try:
                    chunk = sse_event(line)
                except ValueError as e:
                    result.problems.append(str(e))
                    continue
                if chunk is None:
                    continue
                if done:
                    result.problems.append(f"unexpected line {line[:80]!r} after [DONE]")
                    continue
                if chunk == DONE:
                    done = True
                    continue
                if "error" in chunk:
                    result.errors.append(chunk["error"])
                    result.problems.append(f"error event: {chunk['error'].get('message')}")
                    continue
                result.chunks += 1
                _check_chunk(chunk, result, first, include_usage)
    except (httpx.HTTPError, KeyError, TypeError) as e:
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
