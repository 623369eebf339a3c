"""Perplexity table of fp / RTN / AWQ / W8 / W8A8 engines on the held-out texts, with quantize time and peak RSS.

    python benchmarks/quant_ppl.py                       # SmolLM2 (the shipped GGUF), the five standard rows
    python benchmarks/quant_ppl.py --configs awq-g64,awq-g64-gptq --windows 10
    python benchmarks/quant_ppl.py --memory              # peak RSS quantizing a random ~1.5 GB model

Each quantization runs as its own `lmconvert quantize` process, so its wall time and peak RSS (from
wait4) are its own. Perplexity: `lmconvert.quant.eval` over the first --windows windows of each text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
TEXTS = {"indomain": DATA / "heldout_indomain.txt", "other": DATA / "heldout_other.txt"}
CONFIGS = {
    "fp": None,
    "rtn-g64": ["--w4", "--group-size", "64", "--no-search-scale", "--no-clip"],
    "awq-g64": ["--w4", "--group-size", "64"],
    "awq-g64-intzero": ["--w4", "--group-size", "64", "--integer-zeros"],  # exportable to AutoAWQ / compressed-tensors
    "awq-g32": ["--w4", "--group-size", "32"],
    "w8": ["--w8"],
    "w8a8": ["--w8a8"],  # SmoothQuant, alpha 0.5
    # ablations: what each AWQ step adds
    "rtn-g32": ["--w4", "--group-size", "32", "--no-search-scale", "--no-clip"],
    "awq-g64-scale-only": ["--w4", "--group-size", "64", "--no-clip"],
    "awq-g64-grid-only": ["--w4", "--group-size", "64", "--no-search-scale"],
    "awq-g64-gptq": ["--w4", "--group-size", "64", "--gptq"],
    "awq-g32-gptq": ["--w4", "--group-size", "32", "--gptq"],
    "w8a8-alpha0.75": ["--w8a8", "--alpha", "0.75"],
    "w8a8-alpha0.3": ["--w8a8", "--alpha", "0.3"],
    # lm_head quantized as well
    "awq-g64-head": ["--w4", "--group-size", "64", "--quant-lm-head"],
    "w8-head": ["--w8", "--quant-lm-head"],
}
STANDARD = ["fp", "rtn-g64", "awq-g64", "awq-g32", "w8", "w8a8"]


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; -> (wall seconds, peak RSS in MiB of that process)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return time.monotonic() - start, usage.ru_maxrss / 1024


def lmconvert(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmconvert.cli", *args]


def fp_engine(src: str, work: Path) -> Path:
    from lmconvert.engine import is_engine_dir

    if is_engine_dir(src):
        return Path(src)
    dst = work / "fp"
    if not dst.exists():
        subprocess.run(lmconvert("convert", "auto", src, "--dst-path", str(dst)), check=True)
    return dst


def table(rows: dict[str, dict]) -> str:
    fp = rows.get("fp", {})
    head = "| engine | " + " | ".join(f"ppl {t} (Δ vs fp)" for t in TEXTS) + " | quantize s | peak RSS MiB |"
    lines = [head, "|" + " --- |" * (len(TEXTS) + 3)]
    for name, r in rows.items():
        cells = []
        for t in TEXTS:
            delta = f" ({100 * (r[t] / fp[t] - 1):+.1f}%)" if t in fp and name != "fp" else ""
            cells.append(f"{r[t]:.3f}{delta}")
        q = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        m = f"{r['rss_mib']:.0f}" if "rss_mib" in r else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {q} | {m} |")
    return "\n".join(lines)


def perplexity_rows(args, work: Path) -> dict[str, dict]:
    from lmconvert.quant.eval import open_for_eval, perplexity, read_text

    fp = fp_engine(args.src, work)
    texts = {t: read_text(p) for t, p in TEXTS.items()}
    rows = {}
    for name in args.configs.split(","):
        row, path = {}, fp
        if CONFIGS[name] is not None:
            path = work / name
            extra = ["--calib-samples", str(args.calib_samples)] if args.calib_samples else []
            device = ["--device", args.device] if args.device else []
            row["seconds"], row["rss_mib"] = run_measured(
                lmconvert("quantize", str(fp), *CONFIGS[name], *extra, *device, "--dst-path", str(path), "--overwrite"))
        engine = open_for_eval(str(path), args.seq_len, device=args.device)
        for t, text in texts.items():
            row[t] = perplexity(engine, text, args.seq_len, args.windows, show_progress=False).ppl
        del engine
        rows[name] = row
        print(json.dumps({name: row}), flush=True)
    return rows


RANDOM_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=13, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                    model_type="llama", bos_token_id=1, eos_token_id=2)


def build_random_checkpoint(dst: Path, tokenizer_from: Path) -> Path:
    """A llama checkpoint of ~1.5 GB bf16 random weights, one safetensors shard per layer (built in little memory)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    c = RANDOM_MODEL
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": rand(c["vocab_size"], h)}]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shards.append({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                       p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                       p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": 1 + rand(h, std=0.1),
                       p + "post_attention_layernorm.weight": 1 + rand(h, std=0.1)})
    weight_map = {}
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in tokenizer_from.iterdir():
        shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def memory_run(args, work: Path) -> None:
    device = args.device
    ckpt = build_random_checkpoint(work / "random-1.5gb", fp_engine(args.src, work) / "tokenizer")
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    cmd = lmconvert("quantize", str(ckpt), "--w4", "--group-size", "128", "--calib-samples", "4",
                    "--dst-path", str(work / "random-w4"), "--overwrite", *(["--device", device] if device else []))
    seconds, rss = run_measured(cmd)
    limit = 0.4 * size / 2**20 + 1024
    print(f"random model {size / 2**30:.2f} GiB: quantized in {seconds:.0f} s, peak RSS {rss:.0f} MiB "
          f"(target <= {limit:.0f} MiB: {'ok' if rss <= limit else 'OVER'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="smollm2", help="fp model: engine dir, checkpoint or GGUF (default: SmolLM2)")
    parser.add_argument("--work", default="/tmp/lmconvert-quant-bench", help="where engines are written")
    parser.add_argument("--configs", default=",".join(STANDARD), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=None, help="override the quantize default")
    parser.add_argument("--device", default=None)
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS run on a random ~1.5 GB model")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.memory:
        return memory_run(args, work)
    print(table(perplexity_rows(args, work)))


if __name__ == "__main__":
    main()
