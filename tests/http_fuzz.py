"""Fuzzing the HTTP API from the OpenAPI schema the server publishes (schemathesis' strategies, driven by plain
hypothesis, so no pytest plugin is involved). Used by tests/test_server_fuzz.py and benchmarks/fuzz_http.py."""

from __future__ import annotations

import time
from collections import Counter

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


def fuzz(url: str, cases: int, timeout_s: float = 60.0, derandomize: bool = False) -> dict:
    """Up to `cases` generated requests an operation, each over real HTTP. A finding: a 5xx, or no answer
    (refused, reset or timed out). Returns counts by status and the first findings with a curl line each."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: Counter[str] = Counter()
    findings: list[dict] = []
    per_operation: dict[str, int] = {}
    start = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        count = 0

        @given(case=operation.as_strategy())
        @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=derandomize)
        def run(case):
            nonlocal count
            count += 1
            try:
                response = case.call(timeout=timeout_s)
            except requests.RequestException as e:
                statuses["no answer"] += 1
                findings.append({"operation": operation.label, "error": f"{type(e).__name__}: {e}"[:300],
                                 "curl": case.as_curl_command()})
                return
            statuses[str(response.status_code)] += 1
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except Exception as e:  # schemathesis' failure (a group of them): a 5xx
                findings.append({"operation": operation.label, "status": response.status_code,
                                 "error": str(e).splitlines()[0][:300], "curl": case.as_curl_command()})

        run()
        per_operation[operation.label] = count
    return {"cases": sum(per_operation.values()), "per_operation": per_operation, "statuses": dict(statuses),
            "findings": findings[:20], "finding_count": len(findings), "wall_s": round(time.monotonic() - start, 1)}
