"""Atomic engine writes: everything goes into a temp dir beside dst, which is renamed into place at the end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from lmconvert.config import ModelConfig
from lmconvert.engine import format as fmt
from lmconvert.errors import UserError


def check_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing dst (unless overwrite) or an unwritable parent before any work is done."""
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists (pass --overwrite to replace it)")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory")
    parent = next((p for p in (dst.parent, *dst.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {dst}: {parent} is not a writable directory")
    return dst


def staging_dir(dst: Path) -> Path:
    """A hidden temp dir beside dst (.NAME.tmp-HOST-PID-XXXX) to write into before the rename. Ctrl-C and
    SIGTERM remove it on the way out; one a killed or crashed run left behind (its process gone from this
    host) is removed here, before a new write starts."""
    prefix = f".{dst.name}.tmp-"
    for old in dst.parent.glob(f"{prefix}*"):
        host, _, pid = old.name[len(prefix):].rpartition("-")[0].rpartition("-")  # HOST-PID-XXXX
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=dst.parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
                      torch.int64: "I64", torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a .safetensors file straight from the tensors' memory.

    safetensors.torch.save_file first copies every tensor into Python bytes, so writing an embedding and
    an lm_head briefly needs twice their size; here each tensor is written from a byte view of its own
    storage (a copy only for a non-contiguous one). The file is the standard format: u64 header size,
    JSON header (sorted names, 8-byte aligned), then the data in header order.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


class EngineWriter:
    """with EngineWriter(dst, overwrite) as w: w.write_globals(...); w.write_layer(i, ...); w.write_config(...)

    Tensor dicts use per-layer suffix keys ("qkv_proj.weight") for layers, engine names for globals.
    The tokenizer goes into `w.tokenizer_dir` (e.g. `source.save_tokenizer(w.tokenizer_dir)`).
    On leaving the block without error the manifest is written and the dir renamed to dst; on error nothing
    is left at dst (an overwritten engine stays as it was).
    """

    def __init__(self, dst: str | os.PathLike, overwrite: bool = False):
        self.dst = check_destination(dst, overwrite)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.bytes_written = 0
        self.format_version = 1  # raised by the first tensor of a later version (see format.py)

    def __enter__(self) -> "EngineWriter":
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = staging_dir(self.dst)
        (self.tmp / "layers").mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    @property
    def tokenizer_dir(self) -> Path:
        path = self.tmp / fmt.TOKENIZER_DIR
        path.mkdir(exist_ok=True)
        return path

    def _save(self, tensors: dict[str, torch.Tensor], rel: str) -> None:
        write_safetensors(tensors, self.tmp / rel)
        self.bytes_written += (self.tmp / rel).stat().st_size

    def write_globals(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = set(tensors) - set(fmt.GLOBAL_NAMES) - set(fmt.QUANTIZED_HEAD_NAMES)
        if unknown:
            raise ValueError(f"not global engine tensors: {sorted(unknown)}")
        self.format_version = max(self.format_version, fmt.min_version(tensors))
        self._save(tensors, fmt.GLOBALS)

    def write_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        prefix = fmt.layer_prefix(i)
        self.format_version = max(self.format_version, fmt.min_version(tensors))
        self._save({prefix + k: v for k, v in tensors.items()}, fmt.layer_file(i))

    def write_config(self, config: ModelConfig, generation_config: dict | None = None) -> None:
        """config.json itself is written at the end, once the format version is known."""
        config.check()  # a config no reader would accept is never written
        self._write_json(fmt.GENERATION_CONFIG, generation_config or {})
        self.config = config

    def _write_json(self, rel: str, data: dict) -> None:
        (self.tmp / rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def _finish(self) -> None:
        config = getattr(self, "config", None)
        if config is None:
            raise RuntimeError("EngineWriter: write_config was never called")
        self._write_json(fmt.CONFIG, {"format_version": self.format_version, **config.to_dict()})
        missing = [fmt.layer_file(i) for i in range(config.num_layers) if not (self.tmp / fmt.layer_file(i)).is_file()]
        missing += [f for f in (fmt.GLOBALS, fmt.TOKENIZER_DIR) if not (self.tmp / f).exists()]
        if missing:
            raise RuntimeError(f"EngineWriter: incomplete engine, missing {missing[:3]}")
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(self.tmp)): {"size": p.stat().st_size, "sha256": fmt.sha256_file(p)}
                    for p in files}
        self._write_json(fmt.MANIFEST, {"format_version": self.format_version, "files": manifest})
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it 0700
        if self.dst.exists():  # overwrite: move the old engine aside first, delete it only once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.old-", dir=self.dst.parent))
            os.replace(self.dst, old / "engine")
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
