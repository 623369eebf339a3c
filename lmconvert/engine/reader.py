"""Open an engine directory: check the manifest, then serve tensors by engine name, one layer at a time."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmconvert.arch import ATTENTION_LINEARS, DENSE_MLP_LINEARS, EXPERT_LINEARS, SHARED_EXPERT_LINEARS
from lmconvert.config import ModelConfig, check_generation_config, check_tensor, parse_dtype
from lmconvert.engine import format as fmt
from lmconvert.errors import UserError
from lmconvert.progress import progress


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"engine file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"engine file {path} is corrupt: {e}") from None
    except RecursionError:
        raise UserError(f"engine file {path} is corrupt: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"engine file {path} is corrupt: not a JSON object")
    return data


SHA256 = re.compile(r"[0-9a-f]{64}")


def _valid_entry(rel, entry) -> bool:
    """A manifest entry: a printable relative path inside the engine, its size and its sha256 in hex."""
    return (isinstance(rel, str) and rel.isprintable() and rel.isascii() and rel and not Path(rel).is_absolute()
            and ".." not in Path(rel).parts and isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and not isinstance(entry["size"], bool) and isinstance(entry.get("sha256"), str)
            and SHA256.fullmatch(entry["sha256"]) is not None)


def check_manifest(root: Path, verify: bool) -> dict:
    """Sizes of all files always (cheap, catches truncation); sha256 too when verify."""
    manifest = read_json(root / fmt.MANIFEST)
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in fmt.READ_VERSIONS:
        raise UserError(f"{root}: engine format {version!r} is not supported (this lmconvert "
                        f"reads formats {', '.join(map(str, fmt.READ_VERSIONS))}); convert the model again")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_valid_entry(rel, entry) for rel, entry in files.items()):
        raise UserError(f"engine file {root / fmt.MANIFEST} is corrupt: \"files\" must map relative paths to "
                        "{\"size\": int, \"sha256\": str}")
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
        check_generation_config(self.generation_config, str(self.path / fmt.GENERATION_CONFIG))
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

    def _check(self, rel: str, tensors: dict[str, torch.Tensor], required: tuple[str, ...], linears: tuple[str, ...],
               prefix: str = "") -> None:
        """Every tensor of a known floating-point name has the config's shape; norms and linears are present."""
        where = f"engine file {self.path / rel}"
        for name, t in tensors.items():
            check_tensor(self.config, name, t, where)
        names = set(tensors)
        optional = (("qkv_proj.bias", self.config.qkv_bias), ("q_norm.weight", self.config.qk_norm),
                    ("k_norm.weight", self.config.qk_norm)) if prefix else \
            (("lm_head.weight", not self.config.tie_word_embeddings and "lm_head.qweight" not in names),)
        extra = [n for n, flag in optional if (prefix + n in names) != flag]
        if extra:
            raise UserError(f"{where}: tensor {prefix + extra[0]} and the config (qkv_bias {self.config.qkv_bias}, "
                            f"qk_norm {self.config.qk_norm}, tie_word_embeddings {self.config.tie_word_embeddings}) "
                            "disagree")
        missing = [prefix + n for n in required if prefix + n not in names]
        missing += [prefix + f"{n}.weight" for n in linears
                    if prefix + f"{n}.weight" not in names and prefix + f"{n}.qweight" not in names]
        if missing:
            raise UserError(f"{where} lacks tensor {missing[0]}")

    def global_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self._load(fmt.GLOBALS)
        head = () if self.config.tie_word_embeddings else ("lm_head",)
        self._check(fmt.GLOBALS, tensors, ("embed_tokens.weight", "norm.weight"), head)
        return tensors

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} out of range (engine has {self.config.num_layers})")
        prefix = fmt.layer_prefix(i)
        tensors = self._load(fmt.layer_file(i))
        c = self.config
        linears = ATTENTION_LINEARS + (EXPERT_LINEARS + ((SHARED_EXPERT_LINEARS if c.shared_expert_intermediate_size
                                                          else ())) if c.is_moe_layer(i) else DENSE_MLP_LINEARS)
        norms = ("input_norm.weight", "post_attn_norm.weight") + (("router.weight",) if c.is_moe_layer(i) else ())
        self._check(fmt.layer_file(i), tensors, norms, linears, prefix)
        return {k[len(prefix):]: v for k, v in tensors.items()}

    def load_tokenizer(self):
        from lmconvert.load.hf import load_hf_tokenizer

        return load_hf_tokenizer(self.path / fmt.TOKENIZER_DIR)

    def save_tokenizer(self, dst: Path) -> None:
        shutil.copytree(self.path / fmt.TOKENIZER_DIR, dst, dirs_exist_ok=True)

    def files(self) -> dict[str, dict]:
        return self.manifest["files"]


def is_engine_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / fmt.MANIFEST).is_file()


def open_engine(path: str | os.PathLike, verify: bool = False) -> Engine:
    return Engine(path, verify=verify)
