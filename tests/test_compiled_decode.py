"""The compiled CPU decode step (runtime/src/compiled_decode.py) against the eager path and the cache-free pass."""

import subprocess
import sys

import pytest
import torch

from lmconvert.runtime import LLMEngine, SamplingParams

KW = {"device": "cpu", "num_cache_tokens": 512, "block_size": 4, "max_batch_size": 4}
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
PROMPTS = [[5, 9, 23, 7, 81], list(range(40, 51)), [3, 3, 3]]


@pytest.fixture
def step_cache(tmp_path, monkeypatch):
    """Compiled steps go to a fresh cache (lmconvert's under XDG_CACHE_HOME, inductor's scratch)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path


def tokens(engine, batch):
    return [o.token_ids for o in engine.generate(batch, GREEDY)]


def test_compiled_decode_matches_eager(tiny_engine, step_cache, monkeypatch):
    """Both compiled graphs (batch 1; a batch of 3), built ahead of time, give the eager engine's greedy tokens
    with contexts crossing KV blocks (block size 4), and every decoded token's logprob is the cache-free forward
    pass's within 1e-5. A second engine loads both from the cache at start: compiled from its first step, in a
    process that never imports torch's compiler. A damaged cached library is removed, not run."""
    path = str(tiny_engine("qwen3"))
    eager, compiled = LLMEngine(path, **KW), LLMEngine(path, compile_decode=True, **KW)
    graphs = compiled.runner.graphs
    graphs.wait(batches=True)
    assert graphs.ready == {False, True} and graphs.backend == {False: "aot", True: "aot"}
    batch_sizes = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda *a: batch_sizes.append(a[0].shape[0]) or run(*a))

    for batch in (PROMPTS[:1], PROMPTS):
        outs = compiled.generate(batch, GREEDY)
        assert [o.token_ids for o in outs] == tokens(eager, batch)
        for prompt, out in zip(batch, outs):
            ref = torch.log_softmax(compiled.logits(prompt + out.token_ids), -1)[len(prompt) - 1:-1]
            for row, entry in zip(ref, out.logprobs):
                assert abs(entry.logprob - row[entry.token_id].item()) <= 1e-5
    assert {1, 3} <= set(batch_sizes)  # both graphs decoded (the eager path did not take over)

    script = ("import sys; from lmconvert.runtime import LLMEngine, SamplingParams\n"
              f"e = LLMEngine({path!r}, compile_decode=True, **{KW!r})\n"
              "g = e.runner.graphs; ready = sorted(g.ready)\n"
              "out = [o.token_ids for o in e.generate([[5, 9, 23, 7, 81]], SamplingParams(max_tokens=20, "
              "temperature=0, ignore_eos=True))]\n"
              "print(ready, len(g._threads), 'sympy' in sys.modules, 'torch._inductor' in sys.modules, out)")

    def fresh_process() -> str:  # a process of its own: this one has the libraries loaded
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True).stdout.splitlines()[-1]

    expected = tokens(eager, PROMPTS[:1])
    assert fresh_process() == f"[False, True] 0 False False {expected}"
    library = graphs.library(False)
    damage = library.with_suffix(".tmp")
    damage.write_bytes(b"\x7fELF truncated")
    damage.replace(library)  # a new file: this process keeps the one it has mapped
    assert fresh_process() == f"[True] 0 False False {expected}"  # decoded eagerly: fewer than 32 steps
    assert not library.exists()


def test_moe_decode_falls_back_to_torch_compile(tiny_engine, step_cache):
    """An MoE step does not export whole (its CPU experts loop over the experts that got tokens): it is compiled
    by torch.compile instead, with the eager engine's greedy tokens."""
    path = str(tiny_engine("qwen3_moe"))
    compiled = LLMEngine(path, compile_decode=True, **KW)
    compiled.runner.graphs.wait()
    assert compiled.runner.graphs.backend == {False: "torch.compile"}
    assert tokens(compiled, PROMPTS[:1]) == tokens(LLMEngine(path, **KW), PROMPTS[:1])


def test_stale_libraries_are_pruned(tmp_path):
    """Libraries no engine loaded for 30 days go when another is built; recently loaded ones stay."""
    import os
    import time

    from lmconvert.runtime.compiled_decode import STALE_DAYS, prune_libraries

    old, recent = tmp_path / "old.so", tmp_path / "recent.so"
    for library in (old, recent):
        library.write_bytes(b"")
    stale = time.time() - (STALE_DAYS + 1) * 86400
    os.utime(old, (stale, stale))
    prune_libraries(tmp_path)
    assert not old.exists() and recent.exists()


def test_library_key_follows_the_cpu(tiny_engine, monkeypatch):
    """A cache shared between machines (an NFS home) keeps one library per CPU kind: the key changes with the
    CPU's instruction sets (inductor compiles for the host's, AVX512-BF16 / AMX included), and with threads."""
    from lmconvert.runtime import compiled_decode

    engine = LLMEngine(str(tiny_engine("qwen3")), **KW)
    model = engine.runner.model
    slots = compiled_decode.model_tensors(model)
    key = compiled_decode.library_key(model, slots, False, 2)
    assert key == compiled_decode.library_key(model, slots, False, 2)
    assert key != compiled_decode.library_key(model, slots, False, 4)
    assert key != compiled_decode.library_key(model, slots, True, 2)
    monkeypatch.setattr(compiled_decode, "cpu_features", lambda: "x86_64 AVX512 avx512f")
    assert key != compiled_decode.library_key(model, slots, False, 2)
