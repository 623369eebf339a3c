"""Open an engine directory: check the manifest, then serve tensors by engine name, one layer at a time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmconvert.config import ModelConfig, parse_dtype
from lmconvert.engine import format as fmt
from lmconvert.errors import UserError
from lmconvert.progress import progress


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"engine file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"engine file {path} is corrupt: {e}") from None


def check_manifest(root: Path, verify: bool) -> dict:
    """Sizes of all files always (cheap, catches truncation); sha256 too when verify."""
    manifest = read_json(root / fmt.MANIFEST)
    if manifest.get("format_version") not in fmt.READ_VERSIONS:
        raise UserError(f"{root}: engine format {manifest.get('format_version')} is not supported (this lmconvert "
                        f"reads formats {', '.join(map(str, fmt.READ_VERSIONS))}); convert the model again")
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise UserError(f"engine file {path} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise UserError(f"engine file {path} is truncated or altered: {size} bytes, manifest says {entry['size']}")
    if verify:  # a minute or more for a large model: with progress
        with progress(transient=True) as bar:
            task = bar.add_task("checking sha256 (bytes)", total=sum(e["size"] for e in manifest["files"].values()))
            for rel, entry in manifest["files"].items():
                if fmt.sha256_file(root / rel) != entry["sha256"]:
                    raise UserError(f"engine file {root / rel} is corrupt: sha256 differs from the manifest")
                bar.advance(task, entry["size"])
    return manifest


class Engine:
    """A converted (maybe quantized) model on disk; a "model source" for the runtime and quantization.

    `dtype` casts floating-point tensors on the way out (quantized integer tensors are left alone).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False, dtype: str | torch.dtype | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"no such engine directory: {self.path}")
        if not (self.path / fmt.MANIFEST).is_file():
            raise UserError(f"{self.path} is not an lmconvert engine (no {fmt.MANIFEST})")
        self.manifest = check_manifest(self.path, verify)
        raw = read_json(self.path / fmt.CONFIG)
        raw.pop("format_version", None)
        self.config = ModelConfig.from_dict(raw)
        self.generation_config = read_json(self.path / fmt.GENERATION_CONFIG)
        self.cast_to = parse_dtype(dtype) if dtype is not None else None
        if self.cast_to is not None:
            from lmconvert.config import DTYPE_NAMES

            self.config.dtype = DTYPE_NAMES[self.cast_to]

    def _load(self, rel: str) -> dict[str, torch.Tensor]:
        try:
            tensors = load_file(self.path / rel)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"engine file {self.path / rel} is corrupt: {e}") from None
        if self.cast_to is not None:
            tensors = {k: v.to(self.cast_to) if v.is_floating_point() else v for k, v in tensors.items()}
        return tensors

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self._load(fmt.GLOBALS)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} out of range (engine has {self.config.num_layers})")
        prefix = fmt.layer_prefix(i)
        return {k[len(prefix):]: v for k, v in self._load(fmt.layer_file(i)).items()}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / fmt.TOKENIZER_DIR)

    def save_tokenizer(self, dst: Path) -> None:
        shutil.copytree(self.path / fmt.TOKENIZER_DIR, dst, dirs_exist_ok=True)

    def files(self) -> dict[str, dict]:
        return self.manifest["files"]


def is_engine_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / fmt.MANIFEST).is_file()


def open_engine(path: str | os.PathLike, verify: bool = False) -> Engine:
    return Engine(path, verify=verify)
