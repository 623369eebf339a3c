"""Every Triton kernel compiles for Hopper (sm_90) with Triton's real compiler, at the launch arguments the
runtime uses on a GPU (Qwen3-8B and SmolLM2 shapes, every tuning candidate), and fits in shared memory.

The CPU interpreter runs code that the compiler refuses (a plain module global read inside a kernel was
one): this catches that here instead of on the device. Launches are recorded, not run: the interpreter's
launch is replaced by a recorder (argument dtypes, ints' divisibility by 16 as Triton specializes them,
constexprs, warps, stages), then a subprocess without TRITON_INTERPRET compiles each distinct one.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmconvert.kernels import int8_linear as il
from lmconvert.kernels import kv_cache, norm, paged_attention_triton, qkv_store, quant_linear as ql, rope
from lmconvert.kernels import activation, allreduce_norm, pending

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200 (227 KiB)
PREFILL_AND_DECODE_M = (1, 16, 64, 65)  # 65: the prefill bucket, as 2048 would be, at a smaller CPU cost
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
TORCH_TYPES = {torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
               torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="this triton has no NVIDIA backend to compile with")


def _describe(fn, args, kwargs) -> dict:
    """One launch as JSON: the kernel's module and name, Triton's signature, constexprs and options."""
    import inspect

    raw = fn.fn
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    params = inspect.signature(raw).parameters
    bound = inspect.signature(raw).bind(*args, **kwargs)
    signature, constexprs, aligned = {}, {}, []
    for i, (name, value) in enumerate(bound.arguments.items()):
        annotation = params[name].annotation
        if "constexpr" in str(annotation):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TYPES[value.dtype]
            aligned.append(i)  # torch allocations are 16-byte aligned on the GPU
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specializes ints equal to 1 into constants
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    aligned.append(i)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{raw.__name__}: argument {name} of type {type(value).__name__}")
    if "UPCAST" in constexprs:  # an interpreter-only workaround; the GPU path compiles with it off
        constexprs["UPCAST"] = False
    if "PDL" in constexprs:  # off on CPU tensors; on for sm_90 GPUs
        constexprs["PDL"] = True
    if "ASM" in constexprs:  # the interpreter takes the plain-op twin of each inline PTX block
        constexprs["ASM"] = True
    return {"module": raw.__module__, "name": raw.__name__, "signature": signature, "constexprs": constexprs,
            "aligned": aligned, "options": options}


@pytest.fixture
def recorded(monkeypatch):
    """Launches made inside the test, described, not run."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(_describe(self, args, dict(kwargs)))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return launches


def _gpu_launches():
    """The launches a Qwen3-8B / SmolLM2 engine makes on a GPU: linears at decode and prefill sizes with every
    tuning candidate, attention (bf16 and int8 KV, decode with and without splits, prefill), and the rest."""
    dt = torch.bfloat16
    for K, N, G in ((4096, 6144, 128), (12288, 4096, 128), (576, 1536, 64), (576, 1536, 32)):
        w4 = ql._pack_w4(torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32), G)
        w8 = ql._pack_w8(torch.randint(-127, 128, (K, N), dtype=torch.int8), G)
        s = torch.ones(K // G, N, dtype=dt)
        for M in PREFILL_AND_DECODE_M:
            x = torch.randn(M, K, dtype=dt)
            for packed, zeros, bits in ((w4, s, 4), (w8, None, 8)):
                _, cands, run = ql.plan(x, packed, s, zeros, None, G, bits)
                for cfg in cands:
                    run(cfg)
                    if K == 4096 and M in (1, 16):  # split-K finished by the next kernel (pending.py)
                        run(cfg, defer=True)
        a = torch.randint(-127, 128, (K, N), dtype=torch.int8).t().contiguous().t()  # prepare_w8a8's layout
        for M in PREFILL_AND_DECODE_M:
            q, a_scale = torch.zeros(M, K, dtype=torch.int8), torch.ones(M)
            il.quantize_per_token_triton(torch.randn(M, K, dtype=dt))
            _, cands, run = il.plan(q, a_scale, a, torch.ones(N, dtype=dt), None, dt)
            for cfg in cands:
                run(cfg)
    H, KVH, D = 32, 8, 128
    for int8 in (False, True):
        for bs in (16, 64):
            cache = torch.zeros(64, bs, KVH, D, dtype=torch.int8 if int8 else dt)
            scales = torch.zeros(64, bs, KVH, 2, dtype=torch.float16) if int8 else None
            kv = dict(k_scales=scales, v_scales=scales)
            bt = torch.zeros(4, 8, dtype=torch.int32)
            for S, splits in ((4, 1), (4, 4)):  # decode
                paged_attention_triton.paged_attention_triton(
                    torch.randn(S, H, D, dtype=dt), cache, cache, bt, torch.arange(S + 1, dtype=torch.int32),
                    torch.full((S,), 100, dtype=torch.int32), D**-0.5, num_splits=splits, **kv)
            paged_attention_triton.paged_attention_triton(  # prefill, with a sliding window
                torch.randn(200, H, D, dtype=dt), cache, cache, bt[:2], torch.tensor([0, 100, 200], dtype=torch.int32),
                torch.full((2,), 100, dtype=torch.int32), D**-0.5, sliding_window=64, max_seqlen_q=100, **kv)
            kv_cache.store_kv_triton(torch.randn(5, KVH, D, dtype=dt), torch.randn(5, KVH, D, dtype=dt), cache, cache,
                                     torch.arange(5, dtype=torch.int64), scales, scales)
            width = (H + 2 * KVH) * D
            qkvs = (torch.randn(5, width, dtype=dt), pending.PendingSum(torch.zeros(5, width), dt))
            for norm_w in (None, torch.ones(D, dtype=dt)):  # llama-like, Qwen3's q/k norm
                for qkv in qkvs:  # a tensor, a split-K linear's pending sums
                    qkv_store.rope_and_store_triton(qkv, H, torch.arange(5), rope.build_rope_cache(D, 64, 1e6), cache,
                                                    cache, torch.arange(5, dtype=torch.int64), norm_w, norm_w, 1e-6,
                                                    scales, scales)
    x = torch.randn(5, 4096, dtype=dt)
    for src in (x, pending.PendingSum(torch.zeros(5, 4096), dt)):
        norm.rms_norm_triton(src, torch.ones(4096, dtype=dt), 1e-6)
        norm.rms_norm_triton(src, torch.ones(4096, dtype=dt), 1e-6, residual=x.clone())
    for src in (torch.randn(5, 2 * 12288, dtype=dt), pending.PendingSum(torch.zeros(5, 2 * 12288), dt)):
        activation.silu_mul_triton(src)
    pending.take(pending.PendingSum(torch.zeros(5, 4096), dt))
    cache = rope.build_rope_cache(D, 64, 1e6)
    rope.apply_rope_triton(torch.randn(5, H * D, dtype=dt), torch.randn(5, KVH * D, dtype=dt),
                           torch.arange(5), cache)
    for world, hidden, dtype in ((2, 4096, dt), (2, 5120, dt), (4, 4096, torch.float16)):  # TP's fused all-reduce
        x = torch.randn(1, hidden, dtype=dtype)
        for rank in range(world):
            bufs = allreduce_norm.PeerBuffers(rank, world, 16, hidden // 2, torch.zeros(1, dtype=torch.int64),
                                              torch.zeros(world, dtype=torch.int64), torch.zeros(16, dtype=torch.int32),
                                              torch.zeros(1, dtype=torch.int32))
            allreduce_norm.all_reduce_rms_norm(x, x, torch.ones(hidden, dtype=dtype), 1e-6, bufs)


def compile_all(path: str) -> None:
    """Subprocess side (no interpreter): compile each recorded launch for sm_90, one line per failure."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for launch in json.loads(Path(path).read_text()):
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        src = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"],
                        attrs={(i,): [["tt.divisibility", 16]] for i in launch["aligned"]})
        what = f"{launch['name']} {launch['constexprs']} {launch['options']}"
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
            if kernel.metadata.shared > SMEM_LIMIT:
                failures.append(f"{what}: {kernel.metadata.shared} bytes of shared memory")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[-1][:300]}")
    print(json.dumps(failures))


def test_every_gpu_launch_compiles_for_sm90(recorded, tmp_path):
    _gpu_launches()
    unique = list({json.dumps(launch, sort_keys=True): launch for launch in recorded}.values())
    names = {launch["name"] for launch in unique}
    assert {"gemv_kernel", "fused_kernel", "swapped_kernel", "dequant_kernel", "int8_gemm_kernel",
            "quantize_rows_kernel", "_decode_kernel", "_merge_kernel", "_prefill_kernel", "_store_kv_kernel",
            "_rope_and_store_kernel", "_all_reduce_rms_norm_kernel", "_take_kernel", "_silu_mul_kernel",
            "_rms_norm_kernel"} <= names, names
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(unique))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["LMCONVERT_TRITON"] = "1"  # the real kernels, though this host has no CUDA device
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    compile_all(sys.argv[1])
