"""Engine directory layout (docs/engine-format.md is the one-page description of the same)."""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT_VERSION = 4  # the newest version this lmconvert reads and writes
READ_VERSIONS = (1, 2, 3, 4)
# Version 2 adds the optional `<linear>.input_perm` tensor (imported GPTQ act-order); version 3 a quantized
# lm_head (`quantize --quant-lm-head`); version 4 mixture-of-experts layers (`router.weight`, `experts.*`).
# An engine is stamped with the lowest version that describes it, so older readers keep reading what they
# understand and refuse the rest.
V2_SUFFIXES = (".input_perm",)
V4_PREFIXES = ("router.", "experts.")
QUANTIZED_HEAD_NAMES = ("lm_head.qweight", "lm_head.scales", "lm_head.zeros")  # version 3
CONFIG = "config.json"  # {"format_version": 1 | 2 | 3 | 4, **ModelConfig fields}
MANIFEST = "manifest.json"  # {"format_version": 1 | 2 | 3 | 4, "files": {relpath: {"size": int, "sha256": hex}}}
GENERATION_CONFIG = "generation_config.json"
GLOBALS = "globals.safetensors"  # embed_tokens.weight, norm.weight, lm_head.weight (untied) or its quantized form
TOKENIZER_DIR = "tokenizer"  # tokenizer files as transformers saves them, chat template included
GLOBAL_NAMES = ("embed_tokens.weight", "norm.weight", "lm_head.weight")


def min_version(names) -> int:
    """The lowest format version that describes tensors of these names (globals or a layer's suffixes)."""
    names = list(names)
    if any(n.startswith(V4_PREFIXES) for n in names):
        return 4
    if any(n in QUANTIZED_HEAD_NAMES for n in names):
        return 3
    return 2 if any(n.endswith(V2_SUFFIXES) for n in names) else 1


def layer_file(i: int) -> str:
    return f"layers/layer_{i:05d}.safetensors"


def layer_prefix(i: int) -> str:
    """Tensors are stored under full engine names ("layers.3.qkv_proj.weight"): each file describes itself."""
    return f"layers.{i}."


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
