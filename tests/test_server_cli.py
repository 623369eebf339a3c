"""`lmconvert serve` as a process: /health turns 200 once the model is loaded, keys apply, Ctrl-C stops it."""

from __future__ import annotations

import shutil
import signal
import socket
from pathlib import Path

import httpx
import pytest

from lmconvert.runtime.serve_client import free_port, spawn_server, wait_healthy


def test_serve_command_end_to_end(tiny_engine):
    proc, url = spawn_server(str(tiny_engine("llama")), "--device", "cpu", "--session-len", "128",
                             "--served-model-name", "tiny", env={"LMCONVERT_API_KEYS": "k1 k2"})
    try:  # up to ~2 minutes while python, torch and the model load; only 503 or no answer on the way
        assert wait_healthy(proc, url), proc.stdout.read() if proc.poll() is not None else "never healthy"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        reply = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k2"}).json()
        assert reply["data"][0]["id"] == "tiny" and reply["data"][0]["max_model_len"] == 128
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_serve_reports_a_bad_model_in_one_line(damage, tiny_engine, tmp_path):
    """Checked before the server starts: the error is the only line, not the last of uvicorn's (issue #24)."""
    model = tmp_path / "engine"
    if damage == "truncated":
        shutil.copytree(tiny_engine("llama"), model)
        weights = model / "globals.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    proc, _ = spawn_server(str(model))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1
    expected = {"missing": f"no such file or directory: {model}",
                "truncated": f"engine file {model}/globals.safetensors is truncated or altered"}[damage]
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), output


def test_serve_on_a_port_in_use_is_one_line(tiny_engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = spawn_server(str(tiny_engine("llama")), port=port)
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1
    assert output.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                           "(choose another --server-port)"]


def test_serve_says_where_it_listens_and_warns_without_a_key(tiny_engine):
    port = free_port()
    proc, url = spawn_server(str(tiny_engine("llama")), "--device", "cpu", "--session-len", "128", host="0.0.0.0",
                             port=port)
    try:
        assert wait_healthy(proc, url)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert f"lmconvert serve: http://0.0.0.0:{port}/v1" in output
    assert "listening on 0.0.0.0 with no API key" in output
    assert "loaded; ready" in output


def test_deployment_files_agree_with_the_server():
    """The image exposes and serves the port the manifest probes, and every probe asks /health."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    dockerfile = (root / "Dockerfile").read_text()
    assert "EXPOSE 23333" in dockerfile
    assert 'ENTRYPOINT ["lmconvert", "serve", "--server-name", "0.0.0.0", "--server-port", "23333"]' in dockerfile
    deployment, service = yaml.safe_load_all((root / "deploy" / "kubernetes.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http", "containerPort": 23333}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["env"][0]["name"] == "LMCONVERT_API_KEYS"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
