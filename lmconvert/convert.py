"""Checkpoint (canonical names) -> engine (fused names), streamed one decoder layer at a time.

The fusing below is the only place where canonical names become engine names; both the on-disk path
(`convert`) and the in-memory path (`ConvertedModel`, used when chat/quantize get a raw checkpoint) use it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from rich.progress import TextColumn

from lmconvert.arch import FUSED_EXPERTS, FUSED_MODULES
from lmconvert.config import DTYPE_NAMES, W4_GROUP_SIZES, ModelConfig, largest_group_size, parse_dtype
from lmconvert.engine.format import GLOBAL_NAMES
from lmconvert.engine.writer import EngineWriter, check_destination
from lmconvert.errors import UserError
from lmconvert.load import open_checkpoint
from lmconvert.progress import progress
from lmconvert.templates import store_chat_template


def fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer canonical suffixes -> engine suffixes: q/k/v -> qkv_proj, gate/up -> gate_up_proj (rows
    concatenated; an expert stack's rows are its dim -2)."""
    out = dict(tensors)
    for fused, parts in {**FUSED_MODULES, **FUSED_EXPERTS}.items():
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in parts]
            if all(n in out for n in names):
                out[f"{fused}.{kind}"] = torch.cat([out.pop(n) for n in names], dim=-2 if kind == "weight" else -1)
            elif any(n in out for n in names):
                raise ValueError(f"cannot fuse {fused}.{kind}: only {[n for n in names if n in out]} present")
    return out


def layer_tensors(ckpt, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Engine tensors of decoder layer i, read from the checkpoint one tensor at a time and cast to dtype."""
    if hasattr(ckpt, "layer_tensors"):  # pre-quantized checkpoints fuse their packed linears themselves
        return ckpt.layer_tensors(i, dtype)
    raw = {s: ckpt.get(f"layers.{i}.{s}").to(dtype) for s in ckpt.arch.layer_names(ckpt.config.is_moe_layer(i))}
    return fuse(raw)


def global_tensors(ckpt, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = [n for n in GLOBAL_NAMES if n != "lm_head.weight" or not config.tie_word_embeddings]
    return {n: ckpt.get(n).to(dtype) for n in names}


def target_config(ckpt, dtype: str | torch.dtype | None) -> ModelConfig:
    config = dataclasses.replace(ckpt.config, eos_token_ids=list(ckpt.config.eos_token_ids))
    if dtype is not None:
        config.dtype = DTYPE_NAMES[parse_dtype(dtype)]
    return config


class ConvertedModel:
    """A checkpoint seen through engine names without writing anything: the in-memory model source."""

    def __init__(self, ckpt, dtype: str | torch.dtype | None = None):
        self.ckpt = ckpt
        self.config = target_config(ckpt, dtype)
        self.generation_config = ckpt.generation_config
        self.path = ckpt.path

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return global_tensors(self.ckpt, self.config, self.config.torch_dtype)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} out of range (model has {self.config.num_layers})")
        return layer_tensors(self.ckpt, i, self.config.torch_dtype)

    def load_tokenizer(self):
        return self.ckpt.load_tokenizer()

    def save_tokenizer(self, dst: Path) -> None:
        self.ckpt.save_tokenizer(dst)


def convert(src: str | os.PathLike, dst: str | os.PathLike, arch: str = "auto", dtype: str | None = None,
            overwrite: bool = False, model_source: str | None = None, chat_template: str | None = None) -> Path:
    """Convert a checkpoint into an engine directory at dst; returns dst. Peak memory is about one layer.
    chat_template: template text that replaces the model's own in the engine's tokenizer."""
    if dtype is not None:
        parse_dtype(dtype)  # reject a bad dtype before any slow work
    check_destination(dst, overwrite)
    ckpt = open_checkpoint(src, arch=arch, model_source=model_source)
    return write_engine(ConvertedModel(ckpt, dtype), dst, overwrite, f"converting {ckpt.path.name}", chat_template)


def convert_random(spec: str, dst: str | os.PathLike, arch: str = "auto", dtype: str = "bf16",
                   quant: dict | None = None, overwrite: bool = False, seed: int = 0) -> Path:
    """An engine with seeded random weights from a preset or config.json (benchmarks at real sizes)."""
    from lmconvert.load.random_weights import RandomModel, check_arch, config_from

    parse_dtype(dtype)
    check_destination(dst, overwrite)
    config = config_from(spec, DTYPE_NAMES[parse_dtype(dtype)])
    check_arch(arch, config)
    if quant and quant["bits"] == 4 and quant.get("group_size") is None:  # as `quantize --w4`: the largest that fits
        quant = {**quant, "group_size": largest_group_size(config)}
        if quant["group_size"] is None:
            raise UserError(f"no W4 group size ({', '.join(map(str, W4_GROUP_SIZES))}) divides every linear's input")
    return write_engine(RandomModel(config, quant, seed), dst, overwrite, f"random {config.arch} from {spec}")


def write_engine(model, dst: str | os.PathLike, overwrite: bool, description: str,
                 chat_template: str | None = None) -> Path:
    """Write any model source (see lmconvert.engine) to an engine directory, one layer at a time."""
    n = model.config.num_layers
    with EngineWriter(dst, overwrite) as writer, progress(TextColumn("layers {task.fields[written]}")) as bar:
        task = bar.add_task(description, total=n + 1, written="")
        model.save_tokenizer(writer.tokenizer_dir)
        if chat_template is not None:
            store_chat_template(writer.tokenizer_dir, chat_template)
        writer.write_globals(model.global_tensors())
        bar.update(task, advance=1, written=f"{writer.bytes_written / 2**20:.0f} MiB written")
        for i in range(n):
            writer.write_layer(i, model.layer_tensors(i))
            bar.update(task, advance=1, written=f"{writer.bytes_written / 2**20:.0f} MiB written")
        writer.write_config(model.config, model.generation_config)
    return writer.dst
