"""Engine directories: the converted model on disk (see docs/engine-format.md).

Model sources (what the runtime and quantization consume) have `.config`, `.global_tensors()`,
`.layer_tensors(i)`, `.load_tokenizer()`, `.save_tokenizer(dst)`, `.generation_config`, `.path`;
`Engine` (on disk) and `lmconvert.convert.ConvertedModel` (a checkpoint converted on the fly) implement it.
"""

from __future__ import annotations

import os

from lmconvert.arch import get_arch
from lmconvert.engine.format import FORMAT_VERSION
from lmconvert.engine.reader import Engine, is_engine_dir, open_engine
from lmconvert.engine.writer import EngineWriter
from lmconvert.errors import UserError


def open_model(src: str | os.PathLike, arch: str = "auto", dtype: str | None = None, model_source: str | None = None):
    """An Engine for an engine dir; otherwise the checkpoint converted on the fly (nothing written). A model
    source object (an Engine, a RandomModel: anything with layer_tensors) is returned as it is."""
    if hasattr(src, "layer_tensors"):
        return src
    if is_engine_dir(src):
        engine = Engine(src, dtype=dtype)
        if arch != "auto" and get_arch(arch).name != engine.config.arch:
            raise UserError(f"architecture mismatch: asked for {arch!r} but the engine is {engine.config.arch!r}")
        return engine
    from lmconvert.convert import ConvertedModel
    from lmconvert.load import open_checkpoint

    return ConvertedModel(open_checkpoint(src, arch=arch, model_source=model_source), dtype)


__all__ = ["Engine", "EngineWriter", "FORMAT_VERSION", "is_engine_dir", "open_engine", "open_model"]
