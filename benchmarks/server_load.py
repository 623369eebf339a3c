"""Load test for `lmconvert serve`: N streaming requests, C at a time; prints latency percentiles and errors.

    python benchmarks/server_load.py --model ./smol-engine --requests 200 --concurrency 200 --max-tokens 16
    python benchmarks/server_load.py --url http://127.0.0.1:23333 --api-key KEY --endpoint chat

With --model the server runs in this process on a free 127.0.0.1 port; with --url it must already be up.
An error is a request whose stream was not 200, not well formed, or ended without [DONE] (see serve_client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from lmconvert.runtime.serve_client import StreamResult, run_load

TOPICS = ["the sea", "a small town", "machine learning", "the moon", "bread", "a river", "chess", "winter"]


def request_bodies(args) -> list[dict]:
    bodies = []
    for i in range(args.requests):
        prompt = f"Write one sentence about {TOPICS[i % len(TOPICS)]} (request {i})."
        common = {"max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": args.ignore_eos,
                  "stream_options": {"include_usage": True}}
        bodies.append({"messages": [{"role": "user", "content": prompt}], **common} if args.endpoint == "chat"
                      else {"prompt": prompt, **common})
    return bodies


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(results: list[StreamResult], wall_s: float, concurrency: int) -> dict:
    ok = [r for r in results if not r.problems]
    latencies = [r.latency_s for r in ok]
    ttft = [r.first_token_s for r in ok if r.first_token_s is not None]
    tokens = sum(r.usage["completion_tokens"] for r in ok if r.usage)
    return {"requests": len(results), "concurrency": concurrency, "errors": len(results) - len(ok),
            "wall_s": round(wall_s, 2), "requests_per_s": round(len(ok) / wall_s, 2),
            "generated_tokens_per_s": round(tokens / wall_s, 1),
            "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "mean_latency_s": round(statistics.fmean(latencies), 3) if latencies else None,
            "first_problems": [r.problems[0] for r in results if r.problems][:3]}


async def drive(url: str, args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:  # warm-up: one short request
        await client.post(path, json={**request_bodies(args)[0], "max_tokens": 1, "stream": False}, timeout=600)
    start = time.monotonic()
    results = await run_load(url, path, request_bodies(args), args.concurrency, headers, timeout_s=args.timeout)
    return summarize(results, time.monotonic() - start, args.concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="Engine dir or checkpoint to serve in-process.")
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:23333")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="Always generate max-tokens tokens.")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Bound on the whole run, seconds.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--num-cache-tokens", type=int, default=None)
    args = parser.parse_args()

    if args.url:
        report = asyncio.run(drive(args.url.rstrip("/"), args))
    else:
        from lmconvert.runtime import LLMEngine
        from lmconvert.runtime.serve_launch import BackgroundServer
        from lmconvert.runtime.server import create_app

        engine = LLMEngine(args.model, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
                           num_cache_tokens=args.num_cache_tokens)
        with BackgroundServer(create_app(engine, "bench", api_keys=(args.api_key,) if args.api_key else ())) as srv:
            report = asyncio.run(drive(srv.url, args))
        report["device"] = str(engine.device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
