"""The HTTP API fuzzed from the OpenAPI schema the server publishes (schemathesis, issue #28): whatever the
generator sends — valid requests, wrong types, out-of-range numbers, missing fields — no answer is a 5xx.
benchmarks/fuzz_http.py runs the same against a real `lmconvert serve` with thousands of cases."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")  # a test dependency; skipped only in a bare runtime install
from schemathesis.checks import not_a_server_error  # noqa: E402

from lmconvert.runtime import LLMEngine  # noqa: E402
from lmconvert.runtime.serve_launch import BackgroundServer  # noqa: E402
from lmconvert.runtime.server import create_app  # noqa: E402

CASES = int(os.environ.get("LMCONVERT_FUZZ_HTTP_CASES", "60"))  # per operation; CI runs a few hundred in all


@pytest.fixture(scope="module")
def api(tiny_engine):
    """The server over real HTTP, on a tiny engine whose session (64 tokens) bounds every generated request."""
    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", session_len=64, num_cache_tokens=2048)
    with BackgroundServer(create_app(engine, "tiny", max_queue=64)) as srv:
        yield schemathesis.openapi.from_url(f"{srv.url}/openapi.json"), engine


@pytest.fixture(scope="module")
def api_schema(api):
    return api[0]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_makes_a_server_error(case, api):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])


def test_the_fuzzed_server_is_left_clean(api):
    """Run after the fuzzing (file order): every request it started has finished and freed its KV blocks."""
    _, engine = api
    assert not engine.has_unfinished() and engine.block_manager.num_used == 0
