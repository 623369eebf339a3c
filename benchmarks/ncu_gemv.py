"""W4 gemv launches (M = 1, Qwen3-8B's o_proj 4096 -> 4096 and gate_up 4096 -> 24576, group 128), one config
each, for a profiler to compare a small and a large shape:

    ncu --kernel-name regex:gemv_kernel --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        --section LaunchStats --section SchedulerStats python benchmarks/ncu_gemv.py [--config 64,1,4,2,0]
"""

import argparse

import torch

from lmconvert.kernels import quant_linear as ql
from lmconvert.quant.primitives import quantize_w4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="64,1,4,2,0", help="BLOCK_N,BB,blocks a program,warps,stages")
    ap.add_argument("--launches", type=int, default=2)
    args = ap.parse_args()
    cfg = ("gemv", *map(int, args.config.split(",")))
    for K, N in ((4096, 4096), (4096, 24576)):
        qw, s, z = (t.cuda() for t in quantize_w4(torch.randn(N, K), 128, dtype=torch.bfloat16))
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        _, _, run = ql.plan(x, *ql.prepare_w4(qw, s, z, 128), None, 128, 4)
        for _ in range(args.launches):
            run(cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
