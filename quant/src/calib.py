"""Calibration text -> token windows, fully offline and deterministic.

Default text: the shipped lmconvert.calibration_data package. A user file is .txt (the whole file is one
text), .jsonl (one {"text": ...} object per line), or a directory of such files (sorted, not recursive).
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import torch

from lmconvert.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl")


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{n}: expected an object with a "text" string')
        texts.append(record["text"])
    return texts


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    raise UserError(f"unknown calibration file type {path.name!r}: expected .txt, .jsonl or a directory of them")


def load_texts(source: str | Path | None) -> list[str]:
    """Documents of the calibration set (see module docstring)."""
    if source is None:
        root = importlib.resources.files("lmconvert.calibration_data")
        files = sorted((f for f in root.iterdir() if f.name.endswith(TEXT_SUFFIXES)), key=lambda f: f.name)
        with importlib.resources.as_file(root) as folder:
            return [t for f in files for t in _read_file(Path(folder) / f.name)]
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"calibration data {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"{path} holds no .txt or .jsonl calibration files")
        return [t for f in files for t in _read_file(f)]
    return _read_file(path)


def calibration_windows(tokenizer, texts: list[str], samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[samples, seqlen] token ids: distinct non-overlapping windows of the joined texts, picked with `seed`."""
    text = "\n\n".join(t.strip() for t in texts if t.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    available = len(ids) // seqlen
    if available < samples:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than --calib-samples {samples} x "
                        f"--calib-seqlen {seqlen} = {samples * seqlen}: give more text or ask for fewer samples")
    windows = torch.tensor(ids[:available * seqlen], dtype=torch.long).view(available, seqlen)
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return windows[pick.sort().values]
