"""What a server behind a load balancer relies on (issue #28): a bounded queue answered with 429 + Retry-After,
a SIGTERM drain (readiness off at once, in-flight streams finish or end with an error event, exit 0), engine
faults that end only the affected requests or stop the server, and a slow reader that stalls nobody else."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading

import httpx

from lmconvert.runtime import LLMEngine
from lmconvert.runtime.faults import FaultInjector
from lmconvert.runtime import serve_client
from lmconvert.runtime.serve_client import parse_metrics, run_load, spawn_server, wait_healthy
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.server import create_app

from test_server_load import wait_until

LONG = {"prompt": "The quick brown fox", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
SHORT = {"prompt": "The quick brown fox", "max_tokens": 16, "ignore_eos": True, "temperature": 0}


def engine_for(tiny_engine, **kwargs) -> LLMEngine:
    return LLMEngine(str(tiny_engine("llama")), device="cpu", session_len=512, num_cache_tokens=8192, **kwargs)


def served(engine, drain_timeout_s: float = 30.0, **app_kwargs) -> BackgroundServer:
    return BackgroundServer(create_app(engine, "tiny", **app_kwargs), drain_timeout_s=drain_timeout_s)


def streams(url: str, bodies: list[dict]) -> list:
    return asyncio.run(run_load(url, "/v1/completions", bodies, concurrency=len(bodies), timeout_s=120))


def metric(url: str, name: str, labels: str = "") -> float:
    return serve_client.metric(parse_metrics(httpx.get(f"{url}/metrics").text), f"lmconvert_{name}", labels)


def test_a_full_queue_answers_429_with_retry_after(tiny_engine):
    engine = engine_for(tiny_engine, max_batch_size=1)  # one runs, the rest wait
    with served(engine, max_queue=2) as srv:
        results = streams(srv.url, [dict(SHORT, prompt=f"request {i}") for i in range(10)])
        accepted = [r for r in results if r.status == 200]
        refused = [r for r in results if r.status == 429]
        assert len(accepted) + len(refused) == 10
        # at most the running request plus the queue of 2 got in; the others were refused
        assert 2 <= len(accepted) <= 3 and len(refused) >= 7
        for r in accepted:
            assert r.problems == [] and r.finish_reason == {0: "length"}
        for r in refused:
            assert r.retry_after is not None and 1 <= int(r.retry_after) <= 60
            assert "max-queue 2" in r.problems[0] and "queue_full" in r.problems[0]
        assert metric(srv.url, "requests_rejected_total", 'reason="queue_full"') == len(refused)
        assert metric(srv.url, "queue_limit") == 2
        assert wait_until(lambda: engine.block_manager.num_used == 0)
        assert metric(srv.url, "requests_queued") == 0 and metric(srv.url, "kv_cache_usage_ratio") == 0
        # the refusal is OpenAI's error shape, and a request fits again once the queue has moved
        assert httpx.post(f"{srv.url}/v1/completions", json=SHORT, timeout=60).status_code == 200


def test_sigterm_drains_streams_in_flight_then_stops(tiny_engine):
    engine = engine_for(tiny_engine)
    with served(engine) as srv:
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(streams(srv.url, [LONG, LONG])))
        worker.start()
        assert wait_until(lambda: sum(len(s.output_ids) for s in engine.scheduler.running) >= 4)
        srv.sigterm()
        assert wait_until(lambda: httpx.get(f"{srv.url}/health").status_code == 503)
        late = httpx.post(f"{srv.url}/v1/completions", json=SHORT, timeout=60)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert metric(srv.url, "draining") == 1
        worker.join(timeout=120)
        srv.thread.join(timeout=60)
        assert not srv.thread.is_alive()  # the server stopped by itself once the streams were done
    assert [r.problems for r in results] == [[], []]
    assert [r.finish_reason for r in results] == [{0: "length"}] * 2
    assert [r.usage for r in results] == [None, None] and engine.block_manager.num_used == 0


def test_drain_timeout_ends_the_rest_with_an_error_event(tiny_engine):
    engine = engine_for(tiny_engine)
    never_ending = dict(LONG, max_tokens=480)
    with served(engine, drain_timeout_s=0.2) as srv:
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(streams(srv.url, [never_ending])))
        worker.start()
        assert wait_until(lambda: any(s.output_ids for s in engine.scheduler.running))
        srv.sigterm()
        worker.join(timeout=120)
        srv.thread.join(timeout=60)
        assert not srv.thread.is_alive()
    [result] = results
    assert result.status == 200 and "finish_reason" not in result.errors[0]
    assert "drain ended" in result.errors[0]["message"] and result.finish_reason == {}
    assert result.problems == [f"error event: {result.errors[0]['message']}"]  # then [DONE], well formed


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(tiny_engine):
    engine = engine_for(tiny_engine)
    failures: list[str] = []
    with served(engine, on_error=failures.append) as srv:
        engine.faults = FaultInjector("raise", engine.faults.steps + 3)
        [broken] = streams(srv.url, [SHORT])
        assert broken.status == 200 and broken.errors[0]["type"] == "server_error"
        assert "InjectedFault" in broken.errors[0]["message"]
        [fine] = streams(srv.url, [SHORT])
        assert fine.problems == [] and fine.finish_reason == {0: "length"}
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert metric(srv.url, "engine_failed_steps_total") == 1
    assert failures == []


def test_a_broken_engine_turns_health_503_and_stops_the_server(tiny_engine):
    engine = engine_for(tiny_engine)
    failures: list[str] = []
    with served(engine, on_error=failures.append) as srv:
        engine.faults = FaultInjector("raise-from", engine.faults.steps + 1)
        reply = httpx.post(f"{srv.url}/v1/completions", json=SHORT, timeout=60)
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        assert reply.json()["error"]["message"] == "engine error: InjectedFault"  # not a bare "internal server error"
        for _ in range(2):  # every step fails (one request each): the third in a row takes the engine down
            streams(srv.url, [SHORT])
        assert wait_until(lambda: failures != [])
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "the engine failed" in health.json()["error"]["message"]
        assert httpx.post(f"{srv.url}/v1/completions", json=SHORT, timeout=60).status_code == 503
    assert failures[0].startswith("the engine failed: 3 step(s) in a row failed")


def test_nan_logits_end_only_the_affected_request(tiny_engine):
    engine = engine_for(tiny_engine)
    with served(engine) as srv:
        results: list = []
        first = threading.Thread(target=lambda: results.extend(streams(srv.url, [LONG])))
        first.start()
        assert wait_until(lambda: any(s.output_ids for s in engine.scheduler.running))
        second: list = []
        other = threading.Thread(target=lambda: second.extend(streams(srv.url, [dict(LONG, max_tokens=30)])))
        other.start()
        assert wait_until(lambda: len(engine.scheduler.running) == 2
                          and all(s.output_ids for s in engine.scheduler.running))
        engine.faults = FaultInjector("nan", engine.faults.steps + 1)  # row 0: the first request
        first.join(timeout=120)
        other.join(timeout=120)
        assert "NaN logits" in results[0].errors[0]["message"]
        assert second[0].problems == [] and second[0].finish_reason == {0: "length"}
        assert metric(srv.url, "requests_finished_total", 'finish_reason="error"') == 1
        assert wait_until(lambda: engine.block_manager.num_used == 0)


def test_a_client_that_stops_reading_stalls_no_one(tiny_engine):
    engine = engine_for(tiny_engine)
    with served(engine) as srv:
        slow = socket.create_connection(("127.0.0.1", srv.port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # its buffers fill after a few events
        body = json.dumps(dict(LONG, max_tokens=480, stream=True)).encode()
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: any(len(s.output_ids) > 50 for s in engine.scheduler.running))
        others = streams(srv.url, [dict(SHORT, prompt=f"other {i}") for i in range(4)])
        assert [r.problems for r in others] == [[]] * 4
        slow.close()  # the server notices at its next write and frees the sequence
        assert wait_until(lambda: engine.block_manager.num_used == 0 and not engine.has_unfinished())


def test_serve_process_exits_0_after_sigterm_mid_stream(tiny_engine):
    proc, url = spawn_server(str(tiny_engine("llama")), "--device", "cpu", "--session-len", "512",
                             "--drain-timeout", "30")
    try:
        assert wait_healthy(proc, url), "never healthy"
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{url}/v1/completions", json=dict(LONG, max_tokens=200, stream=True)) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
    finally:
        output = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, output
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2], rest[-3:]
    assert "drained: every request in flight finished" in output


def test_serve_exits_non_zero_when_the_engine_breaks(tiny_engine):
    proc, url = spawn_server(str(tiny_engine("llama")), "--device", "cpu", "--session-len", "512",
                             env={"LMCONVERT_INJECT_FAULT": "raise-from@1"})
    try:
        assert wait_healthy(proc, url), "never healthy"
        for _ in range(3):
            assert httpx.post(f"{url}/v1/completions", json=SHORT, timeout=60).status_code in (500, 503)
    finally:
        output = proc.communicate(timeout=90)[0]
    assert proc.returncode == 1
    assert output.rstrip().splitlines()[-1].startswith("error: ")
    assert "the engine failed: 3 step(s) in a row failed" in output.rstrip().splitlines()[-1]


def test_sigterm_does_not_wait_for_a_cpu_compile(tiny_engine, tmp_path):
    """A first CPU compile takes minutes; a drained server exits at once instead of joining it (a pod's grace
    period would otherwise end in SIGKILL)."""
    env = {"LMCONVERT_EAGER": "", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cold-cache")}  # compile, from cold
    proc, url = spawn_server(str(tiny_engine("llama")), "--device", "cpu", "--session-len", "512", env=env)
    try:
        assert wait_healthy(proc, url), "never healthy"
        reply = httpx.post(f"{url}/v1/completions", json=dict(SHORT, max_tokens=40), timeout=120)
        assert reply.status_code == 200  # 40 decode steps: the compile has started behind them
        proc.send_signal(signal.SIGTERM)
    finally:
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "exiting without waiting for the CPU decode step's compile" in output
