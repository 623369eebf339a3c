"""SASS instruction mix of the W4/W8 gemv's main loop, compiled for sm_90 on any machine (no GPU needed).

    python benchmarks/gemv_sass.py [--bits 4] [--configs 128,1,4,0 64,1,2,3 ...]   (BLOCK_N,BB,warps,stages)

Compiles `quant_gemv.gemv_kernel` with Triton's NVIDIA backend, disassembles it with the cuobjdump that
Triton ships and prints, per config, the registers and the instructions of the longest loop (the K walk)
per weight. How the LOP3 / constant-rematerialization fix of session 6 was found and checked.
"""

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmconvert.kernels.quant_gemv import gemv_kernel

POINTERS = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16",
                ws_ptr="*fp32", ws_bits_ptr="*i32", cnt_ptr="*i32")
CONSTEXPRS = ("BITS", "R", "GB", "HAS_BIAS", "ATOMIC", "BLOCK_N", "BB", "STAGES", "CHUNK", "ASM", "DEFER", "PDL")


def compile_gemv(bits, block_n, bb, warps, stages, asm=True):
    signature = dict(POINTERS, N="i32", N_BLOCKS="i32", BLOCKS_PER_SPLIT="i32", **{c: "constexpr" for c in CONSTEXPRS})
    constexprs = dict(BITS=bits, R=16, GB=1, HAS_BIAS=False, ATOMIC=True, BLOCK_N=block_n, BB=bb, STAGES=stages,
                      CHUNK=8, ASM=asm, DEFER=True, PDL=True)
    src = ASTSource(fn=gemv_kernel, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(len(POINTERS) + 2)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def loop_mix(cubin: bytes):
    """(registers, Counter of opcodes in the longest backward branch's body) of a cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    code = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    branches = [(int(m.group(1), 16), at) for at, text in code if (m := re.search(r"BRA (0x[0-9a-f]+)", text))]
    start, end = max(((to, at) for to, at in branches if to < at), key=lambda span: span[1] - span[0])
    ops = Counter(re.sub(r"^@!?U?P\w+ ", "", t).split()[0].split(".")[0] for a, t in code if start <= a <= end)
    return int(re.search(r"REG:(\d+)", usage).group(1)), ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--configs", nargs="*", default=["128,1,4,0", "64,1,2,0", "64,1,2,3", "64,2,4,0"])
    ap.add_argument("--no-asm", action="store_true", help="the plain (w & mask) | magic unpacking")
    args = ap.parse_args()
    for spec in args.configs:
        block_n, bb, warps, stages = map(int, spec.split(","))
        regs, ops = loop_mix(compile_gemv(args.bits, block_n, bb, warps, stages, not args.no_asm).asm["cubin"])
        weights = bb * 16 * block_n * (32 // args.bits) // (32 * warps)  # a thread's weights a loop step
        total = sum(ops.values())
        print(f"BN {block_n} BB {bb} warps {warps} stages {stages}: {regs} regs, {total} instructions a step, "
              f"{total / weights:.2f} a weight; " + " ".join(f"{k} {v}" for k, v in ops.most_common(8)))


if __name__ == "__main__":
    main()
