"""The compiled CPU decode step (runtime/src/compiled_decode.py) against the eager path and the cache-free pass."""

import torch

from lmconvert.runtime import LLMEngine, SamplingParams


def test_compiled_decode_matches_eager(tiny_engine, tmp_path, monkeypatch):
    """Both compiled graphs (batch 1; a batch of 3) give the eager engine's greedy tokens, with contexts crossing
    KV blocks (block size 4), and every decoded token's logprob is the cache-free forward pass's within 1e-5."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = str(tiny_engine("qwen3"))
    kw = dict(device="cpu", num_cache_tokens=512, block_size=4, max_batch_size=4)
    eager, compiled = LLMEngine(path, **kw), LLMEngine(path, compile_decode=True, **kw)
    graphs = compiled.runner.graphs
    graphs.wait(batches=True)
    assert graphs.ready == {False, True}
    batch_sizes = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda *a: batch_sizes.append(a[0].shape[0]) or run(*a))

    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [[5, 9, 23, 7, 81], list(range(40, 51)), [3, 3, 3]]
    for batch in (prompts[:1], prompts):
        outs = compiled.generate(batch, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in eager.generate(batch, params)]
        for prompt, out in zip(batch, outs):
            ref = torch.log_softmax(compiled.logits(prompt + out.token_ids), -1)[len(prompt) - 1:-1]
            for row, entry in zip(ref, out.logprobs):
                assert abs(entry.logprob - row[entry.token_id].item()) <= 1e-5
    assert {1, 3} <= set(batch_sizes)  # both graphs decoded (the eager path did not take over)
