"""deploy/kubernetes.yaml against the Kubernetes JSON schemas, offline: kubernetes-validate (the `test` extra)
bundles them. deploy/container_check.sh runs the same check after building and running the image."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate",
                         reason="kubernetes-validate is not installed (pip install -e '.[test]')")
from kubernetes_validate.utils import ValidationError, latest_version  # noqa: E402

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes.yaml"


def resources() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def test_manifest_is_valid_kubernetes():
    """Every resource passes the strict schema (unknown fields rejected) of the newest Kubernetes bundled."""
    docs = resources()
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for doc in docs:
        kv.validate(doc, latest_version(), strict=True)


def test_the_validator_catches_mistakes():
    """The check has teeth: a misspelt field and a wrongly typed port are both rejected."""
    deployment = resources()[0]
    container = lambda d: d["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    misspelt = copy.deepcopy(deployment)
    container(misspelt)["readinessProbe"]["periodSecnds"] = container(misspelt)["readinessProbe"].pop("periodSeconds")
    wrong_type = copy.deepcopy(deployment)
    container(wrong_type)["ports"][0]["containerPort"] = "23333"
    for bad in (misspelt, wrong_type):
        with pytest.raises(ValidationError):
            kv.validate(bad, latest_version(), strict=True)


def test_grace_period_outlasts_the_drain():
    """SIGTERM drains for --drain-timeout, then uvicorn gets 5 s to finish writing: the kubelet's SIGKILL must come
    later, so terminationGracePeriodSeconds leaves at least 10 s over the drain."""
    pod = resources()[0]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--drain-timeout" in args, "the manifest states the drain it sizes the grace period for"
    drain = float(args[args.index("--drain-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] >= drain + 10
