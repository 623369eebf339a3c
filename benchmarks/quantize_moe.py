"""Quantize a random-weight model with calibration (issue #26: Qwen3-30B-A3B W4 on one GPU): wall time, peak
host RAM, peak GPU memory, output size. The source is generated layer by layer in memory (RandomModel), so no
61 GB bf16 engine has to sit on the device's disk first; only the W4 engine is written.

    python benchmarks/quantize_moe.py [--preset qwen3-30b-a3b] [--device cuda] [--calib-samples 128]
                                      [--layers N] [--dst DIR] [--json FILE]

--layers keeps the first N layers (a quick run, or a CPU check of the script). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lmconvert.load.random_weights import RandomModel, config_from
from lmconvert.quant import QuantConfig, quantize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dst", default=None, help="engine dir to write (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = config_from(args.preset)
    if args.layers:
        cfg.num_layers = args.layers
        cfg.dense_layers = [i for i in cfg.dense_layers if i < args.layers]
    dst = Path(args.dst) if args.dst else Path(tempfile.mkdtemp()) / "engine"
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, calib_samples=args.calib_samples,
                     calib_seqlen=args.calib_seqlen, device=args.device)
    start = time.monotonic()
    result = quantize(RandomModel(cfg), dst, qc)
    wall = time.monotonic() - start
    out = {"preset": args.preset, "layers": cfg.num_layers, "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "scheme": result.scheme, "wall_s": wall, "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
           "engine_gb": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e9,
           "expert_fallbacks": sum(s.expert_fallbacks for s in result.layers)}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if not args.dst:
        shutil.rmtree(dst.parent)


if __name__ == "__main__":
    main()
