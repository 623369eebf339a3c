"""Tensor parallelism by sharding weights as they load and hooking collectives onto existing Linears.

As gpt-fast's tp.py, model.py and layers.py hold no TP code: a rank builds the ordinary Transformer from a
local config (its share of heads and MLP width), loads it from a ShardedSource and calls apply_tp.
  column-parallel: qkv_proj (q heads split; k/v heads split, or replicated when fewer than ranks),
                   gate_up_proj (gate and up split separately), lm_head (vocab, padded; logits all-gathered)
  row-parallel:    o_proj, down_proj (input dim split, output all-reduced; a bias stays on rank 0)
  replicated:      norms, q/k norms, the embedding table
Mixture-of-experts layers split every expert's intermediate dim the same way (experts.gate_up_proj column-,
experts.down_proj row-parallel); the router is replicated, so every rank routes each token alike and the
MoE output is a partial sum like down_proj's.
A row-parallel output always feeds a residual add + RMSNorm (post-attention norm, the next layer's input
norm, the final norm), so the all-reduce happens there: on GPUs with P2P access, decode-sized batches take
one fused kernel (kernels/src/allreduce_norm.py), larger ones NCCL followed by the norm.
Quantized tensors keep the engine layout ([K/8 | K/G | K, N]): a column split cuts N, a row split cuts K,
which must fall on group boundaries. An act-order `input_perm` [K] stays whole on a column-parallel linear
(every rank reads the whole input); on a row-parallel one it must map each rank's slice of K onto itself.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from lmconvert import kernels
from lmconvert.config import ModelConfig
from lmconvert.errors import UserError
from lmconvert.kernels.allreduce_norm import PeerBuffers, all_reduce_rms_norm

QUANT_ATTRS = ("qweight", "scales", "zeros")
COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj", "experts.gate_up_proj", "shared_expert.gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj", "experts.down_proj", "shared_expert.down_proj")
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config one rank builds its model from: its heads and MLP width (vocab stays global)."""
    problems = [f"{what} {n}" for what, n in (("attention heads", cfg.num_heads),
                                              ("intermediate size", cfg.intermediate_size),
                                              ("expert intermediate size", cfg.moe_intermediate_size),
                                              ("shared expert intermediate size", cfg.shared_expert_intermediate_size))
                if n % world]
    nkv = cfg.num_kv_heads
    if (nkv % world if nkv >= world else world % nkv):
        problems.append(f"KV heads {nkv}")
    if problems:
        raise UserError(f"--tp {world} does not divide the model's {', '.join(problems)}")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=max(1, nkv // world),
                               intermediate_size=cfg.intermediate_size // world,
                               moe_intermediate_size=cfg.moe_intermediate_size // world,
                               shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // world)


def kv_heads(cfg: ModelConfig, rank: int, world: int) -> range:
    """KV heads of a rank; with fewer KV heads than ranks each is replicated on world // num_kv_heads ranks."""
    if cfg.num_kv_heads >= world:
        n = cfg.num_kv_heads // world
        return range(rank * n, rank * n + n)
    h = rank * cfg.num_kv_heads // world
    return range(h, h + 1)


def column_segments(module: str, cfg: ModelConfig, rank: int, world: int) -> list[tuple[int, int]]:
    """(start, length) runs of the full output dim that this rank keeps, in order."""
    if module == "qkv_proj":
        D, q = cfg.head_dim, cfg.q_size // world
        heads = kv_heads(cfg, rank, world)
        k = (cfg.q_size + heads.start * D, len(heads) * D)
        return [(rank * q, q), k, (k[0] + cfg.kv_size, k[1])]
    if module in ("gate_up_proj", "experts.gate_up_proj", "shared_expert.gate_up_proj"):
        full = {"gate_up_proj": cfg.intermediate_size, "experts.gate_up_proj": cfg.moe_intermediate_size,
                "shared_expert.gate_up_proj": cfg.shared_expert_intermediate_size}[module]
        n = full // world
        return [(rank * n, n), (full + rank * n, n)]
    raise KeyError(module)


def take_columns(t: torch.Tensor, attr: str, segments: list[tuple[int, int]]) -> torch.Tensor:
    # nn.Linear weight / bias: [(E,) N, K] / [N]; quantized: [(E,) ., N]
    dim = -1 if attr in QUANT_ATTRS or attr == "bias" else -2
    return torch.cat([t.narrow(dim, s, n) for s, n in segments], dim)  # a copy: the full tensor can go


def take_rows(t: torch.Tensor, attr: str, rank: int, world: int, name: str) -> torch.Tensor | None:
    """Row-parallel share of the input dim K; None for a bias off rank 0 (added once, before the all-reduce)."""
    if attr == "bias":
        return t if rank == 0 else None
    dim = -2 if attr in QUANT_ATTRS else -1  # quantized: [(E,) K or K/8 or K/G, N]; nn.Linear: [(E,) N, K]
    rows = t.shape[dim]
    if attr != "weight" and rows == 1:  # W8 per-channel scales: one group spanning K, the same on every rank
        return t
    if rows % world:
        what = "quantization groups" if attr in ("scales", "zeros") else "input rows"
        raise UserError(f"{name}: {rows} {what} do not split evenly over --tp {world} (splits must fall on group "
                        "boundaries)")
    n = rows // world
    return t.narrow(dim, rank * n, n).clone()


def shard_input_perm(perm: torch.Tensor, rank: int, world: int, name: str) -> torch.Tensor:
    """Row-parallel input_perm: this rank's slice, renumbered locally; refused if any rank's slice reaches into
    another rank's input rows (checked for all ranks alike, so every rank stops, not just one)."""
    K = perm.numel()
    if K % world:
        raise UserError(f"{name}: {K} input rows do not split evenly over --tp {world}")
    n = K // world
    if not torch.equal(perm.long() // n, torch.arange(K) // n):
        raise UserError(f"{name}: the act-order input permutation crosses the --tp {world} shard boundaries "
                        "(row-parallel linear); run this engine with --tp 1")
    return perm[rank * n:(rank + 1) * n] - rank * n


def vocab_shard(t: torch.Tensor, attr: str, vocab: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of lm_head's vocab, zero-padded to ceil(vocab / world) so all-gather sizes match."""
    dim = -1 if attr in QUANT_ATTRS else 0
    per = -(-vocab // world)
    start, end = min(vocab, rank * per), min(vocab, rank * per + per)
    part = t.narrow(dim, start, end - start)
    pad = list(part.shape)
    pad[dim] = per - (end - start)
    return torch.cat([part, part.new_zeros(pad)], dim)


class ShardedSource:
    """A model source (see lmconvert.engine) that yields one rank's shard of every tensor."""

    def __init__(self, source, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world
        self.full_config: ModelConfig = source.config
        self.config = shard_config(source.config, world)

    def __getattr__(self, name):  # tokenizer, generation_config, path, ... of the wrapped source
        return getattr(self.source, name)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.source.global_tensors())
        if not any(k.startswith("lm_head.") for k in tensors):  # tied: the head is a vocab slice of the embedding
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        vocab = self.full_config.vocab_size
        return {k: vocab_shard(v, k.rsplit(".", 1)[1], vocab, self.rank, self.world) if k.startswith("lm_head.") else v
                for k, v in tensors.items()}

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.source.layer_tensors(i).items():
            module, attr = name.rsplit(".", 1)
            if attr == "input_perm":
                if module in ("o_proj", "down_proj"):
                    t = shard_input_perm(t, self.rank, self.world, f"layers.{i}.{name}")
            elif module in COLUMN_PARALLEL:
                t = take_columns(t, attr, column_segments(module, self.full_config, self.rank, self.world))
            elif module in ROW_PARALLEL:
                t = take_rows(t, attr, self.rank, self.world, f"layers.{i}.{name}")
            if t is not None:
                out[name] = t
        return out


FUSED_MAX_ROWS = 16  # tokens a step up to which the fused kernel all-reduces (decode batches); NCCL above


_rendezvous_done = False  # see peer_buffers


def peer_buffers(device: torch.device, hidden: int, group=None) -> PeerBuffers | None:
    """Receive buffers of the fused all-reduce in symmetric memory, every rank's mapped into each process.

    None (NCCL everywhere) off CUDA, without P2P access between all GPUs, for an odd hidden size, with
    LMCONVERT_TP_ALLREDUCE=nccl, and for a second TP engine built in the same process: torch numbers its
    symmetric-memory rendezvous per process, so the new workers' first one would not meet rank 0's second
    (it hangs); every rank learns whether any has done one and then all keep to NCCL."""
    global _rendezvous_done
    world = dist.get_world_size(group)
    if (device.type != "cuda" or hidden % 2 or os.environ.get("LMCONVERT_TP_ALLREDUCE", "fused") == "nccl"
            or not all(torch.cuda.can_device_access_peer(device.index, peer)
                       for peer in range(torch.cuda.device_count()) if peer != device.index)):
        return None
    done_before = torch.tensor([int(_rendezvous_done)], device=device)
    dist.all_reduce(done_before, op=dist.ReduceOp.MAX, group=group)
    if done_before.item():
        return None
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # P2P stores only, no NVLink multicast
    from torch.distributed import _symmetric_memory as symm_mem

    shape = PeerBuffers.shape(world, FUSED_MAX_ROWS, hidden // 2)
    recv = symm_mem.empty(*shape, dtype=torch.int64, device=device).zero_()
    handle = symm_mem.rendezvous(recv, (group or dist.group.WORLD).group_name)
    _rendezvous_done = True
    peers = torch.tensor([handle.get_buffer(r, shape, torch.int64).data_ptr() for r in range(world)],
                         dtype=torch.int64, device=device)
    handle.barrier()  # every buffer is zeroed before any rank can write into it
    return PeerBuffers(dist.get_rank(group), world, FUSED_MAX_ROWS, hidden // 2, recv, peers,
                       torch.zeros(FUSED_MAX_ROWS, dtype=torch.int32, device=device),
                       torch.zeros(1, dtype=torch.int32, device=device))


class ReducingRMSNorm(nn.Module):
    """norm(x, residual) where x is a rank's partial sum: all-reduce x, then the residual add and RMSNorm."""

    def __init__(self, norm: nn.Module, group, bufs: PeerBuffers | None):
        super().__init__()
        self.norm, self.group, self.bufs = norm, group, bufs

    def forward(self, x, residual):
        x = kernels.take(x)  # a deferred split-K output (kernels/src/pending.py) becomes a tensor to reduce
        if self.bufs is not None and self.bufs.fits(x):
            return all_reduce_rms_norm(x, residual, self.norm.weight, self.norm.eps, self.bufs)
        dist.all_reduce(x, group=self.group)
        return kernels.rms_norm(x, self.norm.weight, self.norm.eps, residual)


def apply_tp(model, world: int, vocab_size: int, group=None, bufs: PeerBuffers | None = None) -> None:
    """Row-parallel outputs are all-reduced by the norms that take them in (module docstring); the
    vocab-parallel logits are all-gathered (a forward hook)."""

    def all_gather(_module, _inputs, out):
        T, per = out.shape
        full = out.new_empty(world * T, per)
        _gather_into(full, out.contiguous(), group=group)
        return full.view(world, T, per).transpose(0, 1).reshape(T, world * per)[:, :vocab_size]

    for i, layer in enumerate(model.layers):
        layer.post_attn_norm = ReducingRMSNorm(layer.post_attn_norm, group, bufs)  # after o_proj
        if i:  # after the previous layer's down_proj (layer 0's input is the embedding)
            layer.input_norm = ReducingRMSNorm(layer.input_norm, group, bufs)
    model.norm = ReducingRMSNorm(model.norm, group, bufs)
    model.lm_head.register_forward_hook(all_gather)
