"""Mutation fuzzing of the loaders, CI-sized (issue #28): a few dozen hypothesis-driven cases per target.

Each case mutates one file of a tiny valid seed and runs the entry point a user hits (convert, engine open +
info, tokenizer load) in a forked worker with a time limit and an address-space cap; the only outcomes allowed
are a working model or a one-line UserError. The mutators, targets and worker are in fuzz_harness.py;
benchmarks/fuzz_loaders.py runs >= 10,000 cases per target.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_harness as fh

CASES_PER_TARGET = 40


@pytest.fixture(scope="module")
def seeds(tiny_checkpoint, tmp_path_factory):
    return fh.build_seeds(tmp_path_factory.mktemp("fuzz-seeds"), hf=tiny_checkpoint("qwen2"))


@pytest.fixture(scope="module")
def runner(seeds):
    r = fh.Runner(seeds, soft_timeout=5.0, hard_timeout=10.0)
    yield r
    r.close()


@pytest.fixture(scope="module")
def mutator(seeds):
    return fh.Mutator(seeds)


@pytest.mark.parametrize("target", sorted(fh.TARGETS))
def test_fuzz_target(target, runner, mutator):
    seen = []

    @settings(max_examples=CASES_PER_TARGET, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False))
    def case(rng):
        outcome = runner.run(target, len(seen), mutator(target, rng))
        seen.append(outcome.kind)
        assert outcome.allowed, f"{target}: {outcome.kind} {outcome.message} @ {outcome.where}"

    case()
    assert len(seen) >= CASES_PER_TARGET // 2  # hypothesis ran the cases (it may stop early on duplicates)


@pytest.mark.parametrize("command, kind", [
    (b"fine", "ok"), (b"error", "error"), (b"two lines", "multiline"), (b"raise", "exception"),
    (b"alloc", "memory"), (b"loop", "timeout"), (b"hang", "hang"), (b"abort", "crash"),
])
def test_harness_detects_each_finding(command, kind, seeds):
    """The worker reports a big allocation, a Python loop, a signal-deaf hang and an abort as findings."""
    r = fh.Runner(seeds, soft_timeout=1.0, hard_timeout=3.0)
    try:
        outcome = r.run(fh.SELFTEST.name, 0, command)
        assert outcome.kind == kind, outcome
        assert outcome.allowed == (kind in ("ok", "error"))
        assert r.run(fh.SELFTEST.name, 1, b"fine").kind == "ok"  # a fresh worker after a hang or a crash
    finally:
        r.close()
