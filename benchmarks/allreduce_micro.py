"""All-reduce of decode-sized bf16 messages on the GPUs of one host: NCCL against torch's one-shot all-reduce
over symmetric memory (P2P loads, no multicast) and, with the residual add + RMSNorm that follow it in the
model, NCCL + `rms_norm` against lmconvert's fused `all_reduce_rms_norm` (kernels/src/allreduce_norm.py).
Results are checked against NCCL's (and across ranks), then timed inside CUDA graphs (back-to-back, so
the time is the collective's own latency, without rank skew).

    python benchmarks/allreduce_micro.py [--gpus 2]
"""

import argparse
import os
import tempfile

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SHAPES = [(1, 4096), (1, 5120), (8, 5120), (16, 4096), (64, 4096), (192, 5120), (256, 4096)]
MAX_ELEMS = 1 << 20


def graph_us(fn, reps: int = 100) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    dist.barrier()
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def fused_vs_nccl(T: int, hidden: int, rank: int, dev) -> str:
    """NCCL all-reduce + rms_norm against the fused kernel: agreement (with NCCL, across ranks), then time."""
    from lmconvert.kernels import rms_norm
    from lmconvert.kernels.allreduce_norm import all_reduce_rms_norm
    from lmconvert.runtime.tp import peer_buffers

    if not BUFFERS:  # one rendezvous a process (runtime/src/tp.py: peer_buffers), rows of the widest hidden
        BUFFERS.append(peer_buffers(dev, max(h for _, h in SHAPES)))
    bufs = BUFFERS[0]
    x = torch.randn(T, hidden, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(10 + rank))
    residual = torch.randn(T, hidden, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(3))
    weight = 1 + 0.1 * torch.randn(hidden, device=dev, generator=torch.Generator(dev).manual_seed(7)).to(x.dtype)
    reduced = x.clone()
    dist.all_reduce(reduced)
    ref_out, ref_res = rms_norm(reduced, weight, 1e-6, residual)
    out, res = all_reduce_rms_norm(x, residual, weight, 1e-6, bufs)
    torch.cuda.synchronize()
    mine = torch.cat([out, res])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    same_on_ranks = all(torch.equal(e.view(torch.int16), every[0].view(torch.int16)) for e in every)  # bitwise
    diff = max((out.float() - ref_out.float()).abs().max().item(), (res.float() - ref_res.float()).abs().max().item())
    equal = (out == ref_out).float().mean().item()

    y = x.clone()

    def nccl_norm():  # in place, like the model's (values grow over the replays: only the time counts)
        dist.all_reduce(y)
        rms_norm(y, weight, 1e-6, residual)

    nccl_us = graph_us(nccl_norm)
    fused_us = graph_us(lambda: all_reduce_rms_norm(x, residual, weight, 1e-6, bufs))
    assert bufs.status.item() == 0, "a poll gave up"
    return (f"; + RMSNorm: NCCL + norm {nccl_us:.1f} us, fused {fused_us:.1f} us (vs NCCL: max diff {diff:.3g}, "
            f"{equal:.1%} of outputs equal; ranks {'agree' if same_on_ranks else 'DIFFER'})")


BUFFERS = []  # the PeerBuffers, once made


def worker(rank: int, world: int, init: str) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, device_id=dev)
    from torch.distributed import _symmetric_memory as symm_mem

    name = dist.group.WORLD.group_name
    buf = symm_mem.empty(MAX_ELEMS, dtype=torch.bfloat16, device=dev)
    handle = symm_mem.rendezvous(buf, name)
    handle.barrier()
    for T, hidden in SHAPES:
        x = torch.randn(T, hidden, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(rank))
        ref = x.clone()
        dist.all_reduce(ref)
        n = x.numel()
        one = torch.ops.symm_mem.one_shot_all_reduce_copy(buf[:n].view_as(x), x, "sum", name)
        torch.cuda.synchronize()
        err = (one.float() - ref.float()).abs().max().item()
        nccl_us = graph_us(lambda: dist.all_reduce(x))
        one_us = graph_us(lambda: torch.ops.symm_mem.one_shot_all_reduce_copy(buf[:n].view_as(x), x, "sum", name))
        from lmconvert.runtime.tp import FUSED_MAX_ROWS

        fused = fused_vs_nccl(T, hidden, rank, dev) if T <= FUSED_MAX_ROWS else ""
        if rank == 0:
            print(f"{T} x {hidden}: max diff {err:.3g}; in a graph: NCCL {nccl_us:.1f} us, one-shot {one_us:.1f} us"
                  f"{fused}", flush=True)
    dist.barrier()
    BUFFERS.clear()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    args = ap.parse_args()
    init = "file://" + os.path.join(tempfile.mkdtemp(), "store")
    mp.spawn(worker, args=(args.gpus, init), nprocs=args.gpus)


if __name__ == "__main__":
    main()
