"""Mutation fuzzing of the loaders (issue #28): N cases per target, counts, time and findings per target.

    python benchmarks/fuzz_loaders.py                         # 10,000 cases for each target
    python benchmarks/fuzz_loaders.py --cases 500 --target gguf_header --target safetensors
    python benchmarks/fuzz_loaders.py --target config_json --replay 1234   # one case, its outcome and file

Targets, mutations, entry points and what counts as a finding: tests/fuzz_harness.py. Case i of a target
uses random.Random(seed_base + i), so a finding is replayed from its target and seed. tests/test_fuzz_loaders.py
runs a few hundred cases of the same in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fuzz_harness as fh  # noqa: E402


def fuzz_target(runner: fh.Runner, mutator: fh.Mutator, target: str, cases: int, seed_base: int,
                max_seconds: float) -> dict:
    kinds: Counter = Counter()
    findings: dict[str, dict] = {}
    start = time.perf_counter()
    done = 0
    for i in range(cases):
        if time.perf_counter() - start > max_seconds:
            break
        seed = seed_base + i
        outcome = runner.run(target, seed, mutator(target, random.Random(seed)))
        kinds[outcome.kind] += 1
        done += 1
        if not outcome.allowed:
            f = findings.setdefault(outcome.signature, {"count": 0, "seed": seed, "message": outcome.message})
            f["count"] += 1
    seconds = time.perf_counter() - start
    return {"target": target, "cases": done, "seconds": round(seconds, 1), "outcomes": dict(kinds),
            "findings": findings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per target")
    parser.add_argument("--target", action="append", choices=sorted(fh.TARGETS), help="default: all")
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="per target bound")
    parser.add_argument("--replay", type=int, default=None, help="run this one seed and keep its file")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    targets = args.target or list(fh.TARGETS)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lmfuzz-seeds-", dir=shm) as tmp:
        seeds = fh.build_seeds(Path(tmp))
        mutator = fh.Mutator(seeds)
        runner = fh.Runner(seeds)
        try:
            if args.replay is not None:
                for target in targets:
                    data = mutator(target, random.Random(args.replay))
                    keep = Path(f"fuzz-{target}-{args.replay}.bin")
                    keep.write_bytes(data)
                    outcome = runner.run(target, args.replay, data)
                    print(f"{target} seed {args.replay}: {outcome.kind} {outcome.message} {outcome.where} "
                          f"(mutated file: {keep})")
                return
            results = []
            print(f"{'target':<18} {'cases':>6} {'ok':>6} {'error':>6} {'findings':>8} {'seconds':>8} {'ms/case':>8}")
            for target in targets:
                r = fuzz_target(runner, mutator, target, args.cases, args.seed_base, args.max_minutes * 60)
                results.append(r)
                bad = sum(f["count"] for f in r["findings"].values())
                print(f"{target:<18} {r['cases']:>6} {r['outcomes'].get('ok', 0):>6} "
                      f"{r['outcomes'].get('error', 0):>6} {bad:>8} {r['seconds']:>8} "
                      f"{1000 * r['seconds'] / max(r['cases'], 1):>8.1f}", flush=True)
                for sig, f in sorted(r["findings"].items(), key=lambda kv: -kv[1]["count"]):
                    print(f"    {f['count']:>5} x {sig}  (seed {f['seed']}: {f['message'][:160]})", flush=True)
            print(f"worker restarts (hangs / crashes): {runner.restarts}")
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
        finally:
            runner.close()


if __name__ == "__main__":
    main()
