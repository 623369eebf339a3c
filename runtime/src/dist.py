"""Process groups for tensor parallelism: one process per GPU (or CPU rank), spawned here or by torchrun.

NCCL on GPUs, gloo on CPU. Spawned workers inherit the environment (NCCL_* settings included).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmconvert.errors import UserError


@dataclass(slots=True)
class Launch:
    """Workers started by this process (rank 0), the rendezvous they share, and where a worker that fails
    leaves its one-line error for rank 0 to report (a worker prints no traceback of its own)."""

    store_dir: str
    processes: list = field(default_factory=list)

    @property
    def init_method(self) -> str:
        return f"file://{os.path.join(self.store_dir, 'store')}"

    def error_path(self, rank: int) -> str:
        return os.path.join(self.store_dir, f"rank{rank}.error")

    def worker_error(self) -> str | None:
        """'rank R: <its error>' of the first worker that failed, or None."""
        for rank in range(1, len(self.processes) + 1):
            try:
                with open(self.error_path(rank)) as f:
                    return f"tensor-parallel rank {rank}: {f.read().strip()}"
            except FileNotFoundError:
                continue
        return None


def torchrun_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun (or anything that sets RANK / WORLD_SIZE)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def rank_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """Rank r computes on GPU (first + r) of the host; on CPU every rank shares the CPU."""
    if device.type != "cuda":
        return device
    first = device.index or 0
    if first + world > torch.cuda.device_count():
        raise UserError(f"--tp {world} needs {world} GPUs from cuda:{first}; this host has {torch.cuda.device_count()}")
    torch.cuda.set_device(first + local_rank)
    return torch.device("cuda", first + local_rank)


def init_group(device: torch.device, rank: int, world: int, init_method: str = "env://") -> None:
    if device.type == "cuda":
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)


def close_group(device: torch.device) -> None:
    """Leave the process group. On GPUs it is aborted: once collectives have been captured in CUDA graphs,
    destroy_process_group hangs in ncclCommDestroy (pytorch/pytorch#115388); abort does not wait.
    Either way the default group is gone afterwards, so a later engine can start a new one."""
    if device.type == "cuda" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        torch.cuda.synchronize(device)  # what was sent (the EXIT broadcast) has been delivered
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


def spawn_workers(world: int, target, args: tuple) -> Launch:
    """Starts ranks 1..world-1 as `target(rank, world, store_dir, *args)`; the caller is rank 0."""
    launch = Launch(tempfile.mkdtemp(prefix="lmconvert-tp-"))
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    for rank in range(1, world):
        p = ctx.Process(target=target, args=(rank, world, launch.store_dir, *args), daemon=True)
        p.start()
        launch.processes.append(p)
    return launch
