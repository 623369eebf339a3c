"""The HTTP API fuzzed from the OpenAPI schema the server publishes (schemathesis, issue #28): whatever the
generator sends — valid requests, wrong types, out-of-range numbers, missing fields — no answer is a 5xx.
benchmarks/fuzz_http.py runs the same against a real server with thousands of cases."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("schemathesis")  # a test dependency; skipped only in a bare runtime install
from http_fuzz import fuzz  # noqa: E402

from lmconvert.runtime import LLMEngine  # noqa: E402
from lmconvert.runtime.serve_launch import BackgroundServer  # noqa: E402
from lmconvert.runtime.server import create_app  # noqa: E402

CASES = int(os.environ.get("LMCONVERT_FUZZ_HTTP_CASES", "150"))  # per operation: about 300 cases in all


def test_no_input_makes_a_server_error(tiny_engine):
    """Over real HTTP, on a tiny engine whose session (64 tokens) bounds every generated request; afterwards
    every request it started has finished and freed its KV blocks."""
    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", session_len=64, num_cache_tokens=2048)
    with BackgroundServer(create_app(engine, "tiny", max_queue=64)) as srv:
        report = fuzz(srv.url, CASES, derandomize=True)
    assert report["findings"] == [], report["findings"]
    assert report["per_operation"]["POST /v1/chat/completions"] == CASES
    assert report["per_operation"]["POST /v1/completions"] == CASES
    statuses = report["statuses"]
    assert int(statuses.get("200", 0)) > 0 and int(statuses.get("400", 0)) > 0  # both kinds of input were sent
    assert not engine.has_unfinished() and engine.block_manager.num_used == 0
