"""Where one batch-1 decode step's wall time goes: host work, launch gaps inside the CUDA graph, kernels.

    python benchmarks/decode_anatomy.py [--preset qwen3-8b] [--configs bf16,w8,w4g128] [--session-len 2048]
                                        [--json FILE]

Per config (random weights, 512-token prompt, then steady decode):
- step_ms: wall time of engine.step() (scheduling, input copies, graph replay, sampling, the token sync),
  with overlapped stepping (the default on a GPU); plain_step_ms without it;
- replay_ms: back-to-back replays of the batch-1 graph alone (GPU time with in-graph gaps, no host work);
- kernel_ms / kernels: the sum of the graph's kernel durations and their count (torch profiler);
so host = step - replay and in-graph gaps = replay - kernels. Kernel time is split by kind as in
runtime_gpu.decode_step_profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_gpu import W4, W4_HEAD, W8, W8_HEAD, W8A8, cuda_kernels, engine_for, free  # noqa: E402

from lmconvert.kernels import quant_linear  # noqa: E402
from lmconvert.runtime import SamplingParams  # noqa: E402

CONFIGS = {"bf16": None, "w8": W8, "w4g128": W4, "w8a8": W8A8, "w8_head": W8_HEAD, "w4g128_head": W4_HEAD}


def _timed(fn, n: int) -> float:
    """Milliseconds per call of fn over n calls, synchronized once at the end."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def graph_kernels(replay, steps: int = 20) -> tuple[float, int, dict, list]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    kernels = cuda_kernels(prof, steps)
    kinds: dict[str, float] = {}
    for us, _, _, kind in kernels:
        kinds[kind] = round(kinds.get(kind, 0.0) + us / 1e3, 4)
    total_ms = sum(us for us, *_ in kernels) / 1e3
    count = sum(n for _, n, _, _ in kernels)
    return total_ms, count, kinds, [(round(us, 1), n, name[:70]) for us, n, name, _ in kernels]


def anatomy(preset: str, quant, session_len: int = 2048) -> dict:
    engine = engine_for(preset, quant, 8, session_len)
    plain_ms = _decode_ms(engine, overlap=False)
    step_ms = _decode_ms(engine, overlap=True)
    replay = engine.runner.graphs.graphs[1].replay
    replay_ms = _timed(replay, 200)
    kernel_ms, kernels, kinds, names = graph_kernels(replay)
    # what the runtime's tuner chose for batch-1 steps: (N, K, group, bits, deferred) -> config
    chosen = {f"{k[2]}->{k[1]} g{k[3]} w{k[4]}{' deferred' if k[-1] is True else ''}": list(cfg)
              for k, cfg in quant_linear._tuner.chosen.items() if k[0] == 1 and k[4] == (quant or {}).get("bits")}
    del engine
    free()
    return {"step_ms": round(step_ms, 4), "tok_s": round(1e3 / step_ms, 1), "replay_ms": round(replay_ms, 4),
            "plain_step_ms": round(plain_ms, 4), "plain_tok_s": round(1e3 / plain_ms, 1),
            "kernel_ms": round(kernel_ms, 4), "kernels": kernels, "host_ms": round(step_ms - replay_ms, 4),
            "gaps_ms": round(replay_ms - kernel_ms, 4), "kernel_ms_by_kind": kinds, "kernels_us_count_name": names,
            "linear_configs": chosen}


def _decode_ms(engine, overlap: bool) -> float:
    """Wall milliseconds per engine.step() in steady batch-1 decode, with or without overlapped stepping."""
    engine.overlap = overlap
    rid = engine.add_request(list(range(100, 612)), SamplingParams(max_tokens=1200, temperature=0, ignore_eos=True))
    for _ in range(10):
        engine.step()
    ms = _timed(engine.step, 200)
    engine.abort(rid)
    engine.step()  # commits what is still in flight
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--configs", default="bf16,w8,w4g128")
    ap.add_argument("--session-len", type=int, default=2048,
                    help="the engine's; the decode graphs' KV split count follows it (8192: the CLI default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.configs.split(","):
        results[name] = anatomy(args.preset, CONFIGS[name], args.session_len)
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
