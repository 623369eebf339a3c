"""Continuous batching on CPU: mixed ragged batches, chunked prefill, prefix-cache hits and preemptions
must give exactly the logits / tokens of each request run alone; block accounting returns to zero."""

from __future__ import annotations

import pytest
import torch

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.block_manager import BlockManager
from lmconvert.runtime.sequence import Sequence

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def alone(tiny_engine):
    """Greedy continuations of each prompt, one request at a time, with a roomy cache."""
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=4096, block_size=8)
    ps = prompts(0, [5, 17, 33, 8, 64, 12])
    return ps, [engine.generate([p], GREEDY)[0].token_ids for p in ps]


@pytest.mark.parametrize("overlap", [False, True])
def test_batched_chunked_equals_alone(alone, tiny_engine, overlap):
    ps, expected = alone
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=4096, block_size=8,
                       max_num_batched_tokens=24, overlap=overlap)  # prompts over 24 tokens prefill in chunks
    outs = engine.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert engine.block_manager.num_used == count_cached_only(engine)


def count_cached_only(engine) -> int:
    """Blocks still referenced by someone (none once every request ended)."""
    return sum(1 for b in engine.block_manager.blocks if b.ref_count > 0)


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_by_recompute(alone, tiny_engine, overlap):
    ps, expected = alone
    # 12 blocks of 8 tokens: enough for the longest request (64 + 20) alone, not for all six at once,
    # so some are preempted and recomputed
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=96, block_size=8, overlap=overlap)
    outs = engine.generate(ps, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert count_cached_only(engine) == 0


def test_prefix_cache_hits_give_same_tokens(alone, tiny_engine):
    ps, expected = alone
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=4096, block_size=8)
    first = engine.generate([ps[4]], GREEDY)[0]
    again = Sequence(list(ps[4]), GREEDY)
    engine.block_manager.match_prefix(again)
    assert again.num_computed == 56  # 7 full blocks of the 64-token prompt (one token always recomputed)
    engine.block_manager.free_seq(again)
    second = engine.generate([ps[4]], GREEDY)[0]
    assert first.token_ids == second.token_ids == expected[4]
    # a prompt sharing the first 40 tokens reuses 5 blocks and still matches its solo run
    shared = ps[4][:40] + ps[2]
    solo = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=4096, block_size=8,
                     enable_prefix_caching=False).generate([shared], GREEDY)[0]
    assert engine.generate([shared], GREEDY)[0].token_ids == solo.token_ids


def test_overlap_steps_like_plain_stepping(alone, tiny_engine):
    """Overlapped stepping (the next decode step launched before this one's tokens are read) gives what plain
    stepping gives (a request added while a lookahead is in flight joins one step later): stop tokens and length limits met inside a lookahead, seeded sampling, requests
    joining and one aborted while a lookahead holds it; every block comes back."""
    ps, _ = alone
    path = str(tiny_engine("qwen3"))
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    free_run = LLMEngine(path, device="cpu", num_cache_tokens=1024).generate([ps[1]], sampled)[0].token_ids
    # a token that request 1 first samples at its k-th step, k >= 4: it stops there (others may stop on it too)
    k, stop = next((k, t) for k, t in enumerate(free_run) if k >= 3 and t not in free_run[:k])
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, stop_token_ids=[stop]) for m in (20, 3, 9)]
    params.insert(1, SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True, stop_token_ids=[stop]))
    params += [SamplingParams(max_tokens=15, temperature=0.9, top_p=0.8, seed=s) for s in (1, 2)]

    def run(overlap: bool):
        engine = LLMEngine(path, device="cpu", num_cache_tokens=4096, block_size=8, overlap=overlap)
        ids = [engine.add_request(p, sp) for p, sp in zip(ps[:4], params[:4])]
        finals, steps, lookaheads = {}, 0, 0
        while engine.has_unfinished():
            finals.update((o.request_id, (o.token_ids, o.finish_reason)) for o in engine.step() if o.finished)
            lookaheads += engine._in_flight is not None
            steps += 1
            if steps == 3:
                ids += [engine.add_request(p, sp) for p, sp in zip(ps[4:], params[4:])]
            if steps == 8:
                engine.abort(ids[0])
        engine.step()  # commits a lookahead left in flight, if any (its sequences have all finished)
        return [finals.get(i) for i in ids], steps, lookaheads, count_cached_only(engine)

    plain, overlapped = run(False), run(True)
    assert overlapped[0] == plain[0]
    assert plain[2] == 0 and overlapped[2] > 0.5 * overlapped[1]  # most steps overlapped
    assert plain[0][0] is None and plain[0][1] == (free_run[:k], "stop")  # aborted; stopped
    assert plain[0][2][1] == "length" and len(plain[0][2][0]) == 3
    assert overlapped[3] == plain[3] == 0


def test_paged_logits_equal_dense(tiny_engine):
    """Logits after a chunked paged prefill equal the cache-free forward pass."""
    engine = LLMEngine(str(tiny_engine("mistral")), device="cpu", num_cache_tokens=1024, block_size=8,
                       max_num_batched_tokens=16)
    ids = prompts(3, [50])[0]
    dense = engine.logits(ids)[-1]
    captured = {}
    original = engine.runner.model.compute_logits
    engine.runner.model.compute_logits = lambda h: captured.setdefault("logits", original(h))
    engine.generate([ids], SamplingParams(max_tokens=1, temperature=0))
    assert torch.allclose(captured["logits"][0], dense, atol=1e-5)


def test_abort_frees_blocks(tiny_engine):
    engine = LLMEngine(str(tiny_engine("llama")), device="cpu", num_cache_tokens=1024, block_size=8,
                       enable_prefix_caching=False)
    ids = [engine.add_request(p, GREEDY) for p in prompts(4, [30, 9, 17])]
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used > 0
    for rid in ids:
        engine.abort(rid)
    assert engine.block_manager.num_used == 0 and not engine.has_unfinished()


def test_block_manager_refcounts():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Sequence([1, 2, 3, 4, 5], GREEDY)
    assert bm.ensure_slots(a, 5) and bm.num_free == 1
    a.num_computed = 5
    bm.register_full_blocks(a)
    b = Sequence([1, 2, 3, 4, 9], GREEDY)
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 4
    assert not bm.ensure_slots(b, 7)  # needs 2 more blocks, 1 free: refused, nothing taken
    assert bm.num_free == 1 and len(b.block_table) == 2
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free == 4


def test_cli_overlap_flag(tiny_engine):
    """`--overlap` (a GPU's default, forced here on CPU) prints what `--no-overlap` prints, seeded sampling too."""
    from click.testing import CliRunner

    from lmconvert.cli import main

    base = ["generate", str(tiny_engine("qwen3")), "--prompt", "The quick brown fox", "--device", "cpu",
            "--max-new-tokens", "12", "--num-cache-tokens", "256", "--temperature", "0.8", "--seed", "3"]
    plain, overlapped = (CliRunner().invoke(main, base + [flag]) for flag in ("--no-overlap", "--overlap"))
    assert plain.exit_code == overlapped.exit_code == 0, plain.output + overlapped.output
    assert overlapped.output == plain.output and plain.output.strip()
