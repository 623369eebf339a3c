"""Tensor parallelism on CPU over gloo: tp=2 gives the logits and tokens of tp=1 (fp32, tiny models)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from lmconvert.config import ModelConfig
from lmconvert.errors import UserError
from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.tp import ShardedSource, kv_heads, shard_config, take_rows


def random_ids(n: int, seed: int, vocab: int = 300) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tiny_config(**kw) -> ModelConfig:
    base = dict(arch="qwen3", vocab_size=321, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=True, dtype="fp32",
                max_position_embeddings=512, eos_token_ids=[256])
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def w4_engine(tmp_path_factory):
    """W4 g32 random engine: one KV head (replicated over the ranks), vocab 321 (padded head shards).

    Untied: the random tied head gives logits ~10x larger, whose fp32 rounding alone nears 1e-5.
    """
    from lmconvert.convert import write_engine
    from lmconvert.load.random_weights import RandomModel

    dst = tmp_path_factory.mktemp("tp-w4") / "engine"
    cfg = tiny_config(tie_word_embeddings=False)
    return write_engine(RandomModel(cfg, {"bits": 4, "group_size": 32}), dst, False, "tiny w4")


def test_shard_plan():
    from lmconvert.load.random_weights import RandomModel

    cfg = tiny_config(num_kv_heads=2)
    assert [list(kv_heads(cfg, r, 4)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [list(kv_heads(cfg, r, 2)) for r in range(2)] == [[0], [1]]
    with pytest.raises(UserError, match="attention heads"):
        shard_config(cfg, 3)
    # a row split must fall on group boundaries: 2 groups of K do not split over 4 ranks
    with pytest.raises(UserError, match="group boundaries"):
        take_rows(torch.zeros(2, 8), "scales", 0, 4, "down_proj.scales")
    # the column shards of all ranks together hold every q, k, v row exactly once
    src = RandomModel(tiny_config(num_kv_heads=2, qkv_bias=True))
    full = src.layer_tensors(0)["qkv_proj.bias"]
    parts = [ShardedSource(src, r, 2).layer_tensors(0)["qkv_proj.bias"].split([32, 16, 16]) for r in range(2)]
    assert torch.equal(torch.cat([p[i] for i in range(3) for p in parts]), full)


def test_tp2_matches_tp1(tiny_engine):
    """qwen2 (qkv bias, untied head): dense logits, and greedy tokens through chunked prefill and paged decode."""
    path = str(tiny_engine("qwen2"))
    kw = dict(device="cpu", num_cache_tokens=512, block_size=4, max_num_batched_tokens=16)
    prompts = [random_ids(21, seed=1), random_ids(9, seed=2)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    one = LLMEngine(path, **kw)
    ids = random_ids(40, seed=3)
    ref_logits, ref_out = one.logits(ids), one.generate(prompts, params)
    two = LLMEngine(path, tp=2, overlap=True, **kw)  # lookahead steps send their token ids from the device
    try:
        assert (two.logits(ids) - ref_logits).abs().max().item() <= 1e-5
        assert [o.token_ids for o in two.generate(prompts, params)] == [o.token_ids for o in ref_out]
    finally:
        two.close()


def test_tp2_w4_matches_tp1(w4_engine):
    kw = dict(device="cpu", num_cache_tokens=256)
    ids = random_ids(30, seed=4)
    ref = LLMEngine(str(w4_engine), **kw).logits(ids)
    two = LLMEngine(str(w4_engine), tp=2, **kw)
    try:
        assert (two.logits(ids) - ref).abs().max().item() <= 1e-5
    finally:
        two.close()


def test_tp2_quantized_lm_head_matches_tp1(tmp_path):
    """An INT8 lm_head (--quant-lm-head) shards along the vocab like a bf16 one: 321 rows, zero-padded to 2 x 161."""
    from lmconvert.convert import write_engine
    from lmconvert.load.random_weights import RandomModel

    cfg = tiny_config(tie_word_embeddings=False)
    engine = write_engine(RandomModel(cfg, {"bits": 4, "group_size": 32, "quantize_lm_head": True}), tmp_path / "e", False, "w4")
    kw = dict(device="cpu", num_cache_tokens=256)
    ids = random_ids(30, seed=5)
    ref = LLMEngine(str(engine), **kw).logits(ids)
    two = LLMEngine(str(engine), tp=2, **kw)
    try:
        assert ref.shape[-1] == 321 and (two.logits(ids) - ref).abs().max().item() <= 1e-5
    finally:
        two.close()


def test_tp2_w8a8_close_to_tp1(tmp_path):
    """W8A8 splits like W8 (per-channel scales go with their columns). A row-parallel rank quantizes its own
    share of the input per token, with its own (finer) scale, so tp=2 is close to tp=1 but not equal.
    Measured: 1.4% relative logit difference, the size of W8A8's own activation error on this random model
    (1.3% vs the same weights with fp activations); bound 4%."""
    from lmconvert.convert import write_engine
    from lmconvert.load.random_weights import RandomModel

    quant = {"method": "smoothquant", "bits": 8, "activation_bits": 8, "group_size": None}
    path = write_engine(RandomModel(tiny_config(tie_word_embeddings=False), quant), tmp_path / "engine", False, "w8a8")
    kw = dict(device="cpu", num_cache_tokens=256)
    ids = random_ids(30, seed=5)
    ref = LLMEngine(str(path), **kw).logits(ids)
    two = LLMEngine(str(path), tp=2, **kw)
    try:
        err = ((two.logits(ids) - ref).norm() / ref.norm()).item()
        assert 0 < err < 0.04
    finally:
        two.close()


def test_cli_generate_tp2_prints_tp1(tiny_engine):
    """The real entry point, workers spawned by it or ranks started by torchrun, prints what tp=1 prints."""
    from lmconvert.cli import main

    args = ["generate", str(tiny_engine("qwen3")), "--prompt", "The quick brown fox", "--temperature", "0", "--repetition-penalty", "1.5",
            "--device", "cpu", "--max-new-tokens", "16", "--num-cache-tokens", "256"]
    one = CliRunner().invoke(main, args + ["--tp", "1"])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for launcher in ([sys.executable], torchrun):
        two = subprocess.run([*launcher, "-m", "lmconvert.cli", *args, "--tp", "2"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert two.returncode == 0, two.stderr
        assert two.stdout == one.output


def test_cli_tp_that_does_not_divide_the_model_is_one_line(tiny_engine):
    """The check runs before any worker starts, so no worker prints a traceback of its own (issue #23)."""
    args = ["generate", str(tiny_engine("qwen3")), "--prompt", "Hi", "--device", "cpu", "--tp", "3"]
    done = subprocess.run([sys.executable, "-m", "lmconvert.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert done.returncode == 1
    expected = "error: --tp 3 does not divide the model's attention heads 4, intermediate size 128, KV heads 2"
    assert done.stderr.strip() == expected


class FailsInWorkers:
    """A model source that loads in this process and fails in every spawned worker (a shard unreadable there)."""

    def __init__(self, source):
        self.source, self.in_worker = source, False

    def __getattr__(self, name):
        if name == "source":  # not set yet while unpickling
            raise AttributeError(name)
        return getattr(self.source, name)

    def __setstate__(self, state):
        self.__dict__.update(state, in_worker=True)

    def layer_tensors(self, i):
        if self.in_worker:
            raise OSError(f"layer {i}: shard unreadable on this host")
        return self.source.layer_tensors(i)


def test_a_failing_worker_is_reported_by_rank_0_as_one_line(capfd):
    from lmconvert.load.random_weights import RandomModel

    with pytest.raises(UserError) as failed:
        LLMEngine(FailsInWorkers(RandomModel(tiny_config())), tp=2, device="cpu", num_cache_tokens=256)
    assert str(failed.value) == "tensor-parallel rank 1: layer 0: shard unreadable on this host"
    assert "Traceback" not in capfd.readouterr().err  # the worker printed nothing itself
