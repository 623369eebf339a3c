"""Tensor-parallel figures at real size with random weights: tp=N against tp=1 on the GPUs of one host.

    export PYTHONPATH=$(bash benchmarks/device_setup.sh)
    python benchmarks/tp_gpu.py [--preset qwen3-8b] [--tp 1,2,4] [--quant w4] [--throughput 256] [--json FILE]

--tp lists the sizes to run in turn; every figure is compared with the smallest. Sizes can also run as separate
processes on disjoint GPUs (CUDA_VISIBLE_DEVICES), each with its own --json, merged with --report a.json b.json.
1. agreement: the same random model at each size vs the first, greedy tokens of one prompt and max logit difference;
2. batch-1 latency (512 in / 256 out) at each size, and the decode speed-up and scaling efficiency;
3. with --throughput R: R requests at once (512 in / 256 out) at each size.
Each rank builds the random model itself (the source is pickled to the workers, not its tensors) and keeps
its shard. NVLink multicast stays off (NCCL_NVLS_ENABLE=0), also in the spawned workers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runtime_gpu's profiler helper

from lmconvert.load.random_weights import RandomModel, config_from  # noqa: E402
from lmconvert.runtime import LLMEngine, SamplingParams  # noqa: E402
from lmconvert.runtime.bench import random_prompts, run_bench  # noqa: E402


def build(args, tp: int) -> tuple[LLMEngine, float]:
    quant = {"w4": {"bits": 4, "group_size": args.group_size}, "w8": {"bits": 8, "group_size": None}}.get(args.quant)
    source = RandomModel(config_from(args.preset), quant, device=args.device)
    start = time.monotonic()
    engine = LLMEngine(source, device=args.device, tp=tp, session_len=args.input_len + args.output_len + 16,
                       max_batch_size=max(8, args.throughput), num_cache_tokens=args.num_cache_tokens)
    return engine, time.monotonic() - start


LOGIT_COLUMNS = 2048  # enough of the vocabulary to compare runs made in different processes


def measure(args, tp: int, keep) -> dict:
    """Build, measure, keep(result) (written out before the engine closes: a hang at shutdown loses nothing)."""
    engine, load_s = build(args, tp)
    try:
        result = measure_engine(args, engine, tp, load_s)
        keep(result)
        return result
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def measure_engine(args, engine: LLMEngine, tp: int, load_s: float) -> dict:
    prompt = random_prompts(1, min(64, args.input_len), engine.config.vocab_size, seed=7)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True))[0]
    result = {"tp": tp, "load_s": round(load_s, 1), "greedy": out.token_ids,
              "logits": engine.logits(prompt[:16])[:, :LOGIT_COLUMNS].float().cpu().tolist(),
              "latency": run_bench(engine, "latency", 1, args.input_len, args.output_len).as_dict()}
    # printed now: a throughput run cut short by its time limit must not take the latency figure with it
    print(f"tp={tp}: latency {json.dumps(result['latency'])}", flush=True)
    if args.device.startswith("cuda"):  # where rank 0's decode step goes, all-reduce included
        from runtime_gpu import decode_step_profile

        result["decode_step_profile"] = decode_step_profile(engine)
    if args.throughput:
        result["throughput"] = run_bench(engine, "throughput", args.throughput, args.input_len,
                                         args.output_len).as_dict()
    if args.device.startswith("cuda"):
        result["peak_gib_rank0"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("greedy", "logits")}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-8b", help="random_weights preset or a config.json")
    p.add_argument("--tp", default="1,2", help="sizes to run in turn, e.g. 1,2,4")
    p.add_argument("--quant", choices=["bf16", "w4", "w8"], default="bf16")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--throughput", type=int, default=0, help="requests at once for the throughput run (0: skip)")
    p.add_argument("--num-cache-tokens", type=int, default=None, help="default: 0.8 of free GPU memory")
    p.add_argument("--json", default=None, help="write the runs here (rewritten after each one)")
    p.add_argument("--report", nargs="+", default=None,
                   help="no runs: merge the --json files of earlier runs (e.g. sizes run side by side) into one report")
    args = p.parse_args()

    if args.report:
        runs = [run for path in args.report for run in json.loads(Path(path).read_text())["runs"]]
        head = json.loads(Path(args.report[0]).read_text())
        print(json.dumps(scaling_report(head, runs), indent=1))
        return
    head = {"preset": args.preset, "quant": args.quant,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "runs": []}
    def keep(result):
        head["runs"].append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(head))

    for tp in [int(t) for t in args.tp.split(",")]:  # progress as it goes: a run cut short still says how far it got
        print(f"tp={tp}: building and measuring", flush=True)
        run = measure(args, tp, keep)
        print(f"tp={tp}: load {run['load_s']} s, decode {run['latency']['decode_tok_s']:.1f} tok/s", flush=True)
    if len(head["runs"]) > 1:
        print(json.dumps(scaling_report(head, head["runs"]), indent=1))


def scaling_report(head: dict, runs: list[dict]) -> dict:
    """Every run against the smallest tp size: agreement, decode speed-up, throughput speed-up and efficiency."""
    runs = sorted(runs, key=lambda r: r["tp"])
    base = runs[0]
    report = {k: head[k] for k in ("preset", "quant", "gpu")} | {"tp": [r["tp"] for r in runs], "scaling": []}
    for run in runs[1:]:
        diff = (torch.tensor(run["logits"]) - torch.tensor(base["logits"])).abs().max().item()
        row = {"tp": run["tp"], "vs_tp": base["tp"], "greedy_equal": run["greedy"] == base["greedy"],
               "max_logit_diff": diff,
               "decode_speedup": run["latency"]["decode_tok_s"] / base["latency"]["decode_tok_s"]}
        row["decode_efficiency"] = row["decode_speedup"] * base["tp"] / run["tp"]
        if "throughput" in run and "throughput" in base:
            row["throughput_speedup"] = run["throughput"]["output_tok_s"] / base["throughput"]["output_tok_s"]
            row["throughput_efficiency"] = row["throughput_speedup"] * base["tp"] / run["tp"]
        report["scaling"].append(row)
    report["runs"] = [{k: v for k, v in r.items() if k not in ("greedy", "logits")} for r in runs]
    return report


if __name__ == "__main__":
    main()
