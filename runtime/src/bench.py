"""`lmconvert bench`: latency (batch 1) and throughput (many requests at once) of an engine, optionally
against transformers' generate on a model of the same architecture, size and dtype, in the same process."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from lmconvert.progress import progress
from lmconvert.runtime.engine import LLMEngine
from lmconvert.runtime.sampling import SamplingParams

# What `lmconvert bench` runs when not told: the GPU figures of the README, and on CPU a size that ends in
# about a minute on two cores (the GPU's 256 x (512 in / 256 out) took 17 minutes there).
DEFAULTS = {"cuda": dict(num_prompts=256, input_len=512, output_len=256),
            "cpu": dict(num_prompts=16, input_len=128, output_len=64)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 30000), (n, length), generator=gen).tolist()


@dataclass
class BenchResult:
    mode: str
    num_prompts: int
    input_len: int
    output_len: int
    seconds: float
    output_tok_s: float
    decode_tok_s: float  # latency mode: tokens after the first over their time
    requests_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    kv_cache: str = ""  # the KV cache's element type (int8 with --kv-int8)
    cache_tokens: int = 0  # tokens the KV cache holds
    hf_tok_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def run_bench(engine: LLMEngine, mode: str, num_prompts: int, input_len: int, output_len: int,
              seed: int = 0) -> BenchResult:
    """seed: of the random prompts; runs on one engine with the same seed hit its prefix cache."""
    n = 1 if mode == "latency" else num_prompts
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    prompts = random_prompts(n, input_len, engine.config.vocab_size, seed=seed)
    wait_compiled = getattr(engine.runner.graphs, "wait", None)  # the compiled CPU step: time its steady state
    if wait_compiled is not None:
        wait_compiled(batches=n > 1)
    engine.generate(random_prompts(min(n, 4), input_len, engine.config.vocab_size, seed=1),  # warm-up
                    SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    ids = [engine.add_request(p, params) for p in prompts]
    seqs = {rid: engine.requests[rid].seq for rid in ids}
    _sync(engine.device)
    start = time.monotonic()
    done: dict[int, float] = {}
    with progress(transient=True) as bar:  # its cost: one counter update per step
        task = bar.add_task(f"bench {mode}: {n} x ({input_len} in / {output_len} out) tokens", total=n * output_len)
        while len(done) < n:
            outputs = engine.step()
            for out in outputs:
                if out.finished:
                    done[out.request_id] = time.monotonic()
            bar.advance(task, len(outputs))
    _sync(engine.device)
    elapsed = time.monotonic() - start
    ttft = [seqs[r].first_token_time - start for r in ids]
    itl = [(done[r] - seqs[r].first_token_time) / max(1, output_len - 1) for r in ids]
    decode_rate = statistics.mean((output_len - 1) / max(1e-9, done[r] - seqs[r].first_token_time) for r in ids)
    return BenchResult(mode, n, input_len, output_len, elapsed, n * output_len / elapsed, decode_rate, n / elapsed,
                       1e3 * _percentile(ttft, 50), 1e3 * _percentile(ttft, 99),
                       1e3 * _percentile(itl, 50), 1e3 * _percentile(itl, 99),
                       "int8" if engine.kv_int8 else str(engine.dtype).removeprefix("torch."),
                       engine.runner.num_blocks * engine.block_manager.block_size)


def hf_equivalent(config, device: torch.device, dtype: torch.dtype):
    """A transformers model of the same architecture and sizes (random weights: only its speed is used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmconvert.load.hparams import hf_moe_fields

    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    hf_config = AutoConfig.for_model(
        config.arch, **{"intermediate_size": config.intermediate_size, **hf_moe_fields(config)},
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope, rope_theta=config.rope_theta)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()


@torch.inference_mode()
def hf_generate_tok_s(config, device, dtype, batch: int, input_len: int, output_len: int) -> float:
    """Output tokens per second of transformers' greedy generate on a model equivalent to an engine's (its
    config, device and dtype: the engine itself may be freed first, e.g. where both don't fit one GPU)."""
    model = hf_equivalent(config, device, dtype)
    prompts = torch.tensor(random_prompts(batch, input_len, config.vocab_size), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(prompts, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    _sync(device)
    start = time.monotonic()
    model.generate(prompts, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
    _sync(device)
    rate = batch * output_len / (time.monotonic() - start)
    del model
    return rate
