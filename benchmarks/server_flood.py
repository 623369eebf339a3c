"""Flood test for `lmconvert serve` (issue #28): many more streams at once than the server admits.

    python benchmarks/server_flood.py --model ./smollm2-engine --requests 5000 --concurrency 1000

Starts `lmconvert serve MODEL` as its own process (so its RSS is its own), reads its RSS once warm, fires the
requests, and reports: accepted (200, stream complete), refused (429 with Retry-After), anything else by status
(a 5xx other than 429/503 is a failure), latency percentiles of the accepted, the server's RSS before and after,
and its /metrics once the flood is over (KV blocks and queue back to zero, rejected count = 429s seen).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import percentile, request_bodies  # noqa: E402

from lmconvert.runtime.serve_client import parse_metrics, run_load, spawn_server, wait_healthy  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    """/metrics with the served model's label left out of the sample names."""
    samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    return {k.replace('model_name="bench",', "").replace('{model_name="bench"}', ""): v for k, v in samples.items()}


def start_server(args) -> tuple[subprocess.Popen, str]:
    proc, url = spawn_server(args.model, "--served-model-name", "bench", "--max-queue", str(args.max_queue),
                             "--device", "cpu", *args.serve_args, output=subprocess.DEVNULL)
    if not wait_healthy(proc, url, timeout_s=600):
        raise SystemExit(f"the server never became healthy (exit code {proc.poll()})")
    return proc, url


async def flood(url: str, args) -> tuple[list, float]:
    bodies = request_bodies(args)
    start = time.monotonic()
    results = await run_load(url, "/v1/completions", bodies, args.concurrency, timeout_s=args.timeout)
    return results, time.monotonic() - start


def report(results, wall_s: float, before: float, after: float, after_metrics: dict) -> dict:
    statuses = Counter(r.status for r in results)
    accepted = [r for r in results if r.status == 200]
    complete = [r for r in accepted if not r.problems]
    refused = [r for r in results if r.status == 429]
    latencies = [r.latency_s for r in complete]
    return {
        "requests": len(results), "wall_s": round(wall_s, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "accepted": len(accepted), "accepted_complete": len(complete), "refused_429": len(refused),
        "refused_with_retry_after": sum(r.retry_after is not None for r in refused),
        "unexpected_5xx": sum(v for k, v in statuses.items() if k is not None and k >= 500 and k != 503),
        "no_response": statuses.get(None, 0),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1),
        "kv_blocks_used_after": after_metrics.get("lmconvert_kv_blocks_used"),
        "requests_queued_after": after_metrics.get("lmconvert_requests_queued"),
        "rejected_metric": after_metrics.get('lmconvert_requests_rejected_total{reason="queue_full"}'),
        "first_problems": [r.problems[0] for r in accepted if r.problems][:3],
        "no_response_problems": [r.problems[0] for r in results if r.status is None][:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="Floods in a row (RSS after each).")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("serve_args", nargs="*", help="Extra `lmconvert serve` options, after --.")
    args = parser.parse_args()
    args.endpoint, args.temperature, args.ignore_eos = "completions", 0.0, True

    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.concurrency + 256)), hard))
    proc, url = start_server(args)
    try:
        asyncio.run(run_load(url, "/v1/completions", request_bodies(args)[:32], 32))  # warm: allocator, caches
        before = rss_mb(proc.pid)
        for round_ in range(args.rounds):
            results, wall_s = asyncio.run(flood(url, args))
            time.sleep(1.0)
            out = report(results, wall_s, before, rss_mb(proc.pid), metrics(url))
            print(json.dumps({"round": round_ + 1, **out}), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        print(json.dumps({"server_exit_code": proc.returncode}))


if __name__ == "__main__":
    main()
