"""Fuzz the HTTP API from the OpenAPI schema the server publishes (schemathesis): N cases per operation,
each sent over real HTTP; a 5xx answer, a dropped connection or a hang (per-request timeout) is a finding.

    python benchmarks/fuzz_http.py --model ./smollm2-engine --cases 2500      # 5 operations: 12,500 cases
    python benchmarks/fuzz_http.py --url http://127.0.0.1:23333 --cases 1000

With --model the server runs in this process (session 64 tokens so a generated max_tokens stays cheap).
Prints cases, answers by status, findings (with a curl line to reproduce each) and wall time as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from http_fuzz import fuzz  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="Engine dir to serve in-process.")
    where.add_argument("--url", help="A running server.")
    parser.add_argument("--cases", type=int, default=2000, help="Cases per operation.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Per request, seconds.")
    args = parser.parse_args()
    if args.url:
        report = fuzz(args.url.rstrip("/"), args.cases, args.timeout)
    else:
        from lmconvert.runtime import LLMEngine
        from lmconvert.runtime.serve_launch import BackgroundServer
        from lmconvert.runtime.server import create_app

        engine = LLMEngine(args.model, device="cpu", session_len=64, num_cache_tokens=4096)
        with BackgroundServer(create_app(engine, "fuzz")) as srv:
            report = fuzz(srv.url, args.cases, args.timeout)
        report["engine_clean_after"] = not engine.has_unfinished() and engine.block_manager.num_used == 0
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
