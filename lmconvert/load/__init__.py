"""Loaders: every checkpoint format behind one interface that speaks canonical tensor names.

A Checkpoint has `.config` (ModelConfig, dtype = the checkpoint's), `.generation_config` (dict), `.path`,
`.arch`, `.has(name)`, `.get(name) -> Tensor` (canonical names, see docs/architecture.md, read one at a time),
`.save_tokenizer(dst_dir)` and `.load_tokenizer()`.
"""

from __future__ import annotations

import os

from lmconvert.errors import UserError
from lmconvert.load.gguf_file import GGUFCheckpoint
from lmconvert.load.hf import HFCheckpoint
from lmconvert.load.quantized import QuantizedHFCheckpoint, quantization_config
from lmconvert.load.resolve import resolve_source


def open_checkpoint(src: str | os.PathLike, arch: str = "auto", model_source: str | None = None):
    """Open a HF / ModelScope dir, a GGUF file, a cached model id or an alias, checked against `arch`."""
    path = resolve_source(src, model_source)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:  # a directory holding one GGUF
            return GGUFCheckpoint(ggufs[0], arch)
        if quantization_config(path) is not None:  # AWQ / GPTQ / compressed-tensors: repacked, not requantized
            return QuantizedHFCheckpoint(path, arch)
        return HFCheckpoint(path, arch)
    if path.suffix.lower() == ".gguf":
        return GGUFCheckpoint(path, arch)
    raise UserError(f"{path} is not a model: expected a checkpoint directory or a .gguf file")


__all__ = ["open_checkpoint", "HFCheckpoint", "GGUFCheckpoint", "resolve_source"]
