"""Convert time and peak memory: SmolLM2 GGUF and a random ~1 GB llama-shaped HF checkpoint.

    python benchmarks/convert_memory.py [--size-gb 1.0] [--json out.json]

Each conversion runs in a fresh process. "peak above baseline" is the highest RSS (and anonymous RSS,
sampled every 5 ms) during convert minus the RSS right before it. File-backed RSS includes pages of the
mmapped source the process has touched; the kernel can drop those at will, anonymous memory it cannot.
Budget: about two decoder layers plus the embedding, in the engine dtype.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

MiB = 2**20


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_random_checkpoint(dst: Path, size_gb: float) -> dict:
    """A llama-shaped bf16 checkpoint (hidden 2048, 16 heads / 4 kv, ffn 5632, tied embeddings) in one file."""
    import torch
    from safetensors.torch import save_file

    h, ffn, vocab, heads, kv = 2048, 5632, 32000, 16, 4
    d = h // heads
    layer_params = h * h * 2 + 2 * h * kv * d + 3 * h * ffn + 2 * h
    layers = max(2, round((size_gb * 2**30 / 2 - vocab * h) / layer_params))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv * d, h),
                    p + "self_attn.v_proj.weight": rand(kv * d, h), p + "self_attn.o_proj.weight": rand(h, h),
                    p + "mlp.gate_proj.weight": rand(ffn, h), p + "mlp.up_proj.weight": rand(ffn, h),
                    p + "mlp.down_proj.weight": rand(h, ffn), p + "input_layernorm.weight": rand(h),
                    p + "post_attention_layernorm.weight": rand(h)}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "eos_token_id": 2, "bos_token_id": 1}
    (dst / "config.json").write_text(json.dumps(config))
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tokenizer  # the same tiny tokenizer the tests use

    build_tokenizer().save_pretrained(dst)
    return {"layers": layers, "layer_bytes": layer_params * 2, "embed_bytes": vocab * h * 2}


def measure(src: str, arch: str, dst: str, queue) -> None:
    from lmconvert.convert import convert

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM so the peak covers convert only
    base_rss, base_anon = status_kib("VmRSS"), status_kib("RssAnon")
    peak_anon = [base_anon]
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], status_kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    convert(src, dst, arch=arch)
    seconds = time.perf_counter() - start
    done.set()
    queue.put({"seconds": seconds, "baseline_rss_mib": base_rss / 1024,
               "peak_rss_above_baseline_mib": (status_kib("VmHWM") - base_rss) / 1024,
               "peak_anon_above_baseline_mib": (peak_anon[0] - base_anon) / 1024})


def run_case(src: str, arch: str, dst: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(src, arch, dst, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        smol = run_case("smollm2", "llama", str(tmp / "smol"))
        # 30 layers: q 576x576, k/v 192x576, o 576x576, 3 x 576x1536, bf16; embedding 49152 x 576 bf16
        smol["budget_mib"] = (2 * (576 * 576 * 2 + 2 * 192 * 576 + 3 * 576 * 1536) * 2 + 49152 * 576 * 2) / MiB
        results["smollm2-135m-q4_1-gguf"] = smol
        shape = make_random_checkpoint(tmp / "random", args.size_gb)
        rnd = run_case(str(tmp / "random"), "llama", str(tmp / "random-engine"))
        rnd["source_mib"] = (tmp / "random" / "model.safetensors").stat().st_size / MiB
        rnd["budget_mib"] = (2 * shape["layer_bytes"] + shape["embed_bytes"]) / MiB
        results[f"random-llama-{args.size_gb:g}gb"] = rnd
    print(f"{'case':28} {'time s':>7} {'peak RSS+ MiB':>14} {'peak anon+ MiB':>15} {'budget MiB':>11}")
    for name, r in results.items():
        print(f"{name:28} {r['seconds']:7.1f} {r['peak_rss_above_baseline_mib']:14.0f} "
              f"{r['peak_anon_above_baseline_mib']:15.0f} {r['budget_mib']:11.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
