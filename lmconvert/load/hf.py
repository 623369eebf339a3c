"""Hugging Face / ModelScope checkpoint directories: config.json + (sharded) safetensors, read tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from lmconvert.arch import resolve_arch
from lmconvert.errors import UserError
from lmconvert.load.hparams import hf_model_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def weight_files(root: Path) -> dict[str, Path]:
    """Source tensor name -> safetensors file holding it."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(f"{root} holds only pickle weights ({pickles[0]}); lmconvert reads safetensors only, "
                            "since loading a pickle can run arbitrary code")
        raise UserError(f"{root} has config.json but no *.safetensors weights")
    names = {}
    for file in files:
        with safe_open(file, "pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


class HFCheckpoint:
    """A checkpoint directory in the transformers layout (ModelScope dirs add only configuration.json)."""

    def __init__(self, root: Path, arch: str = "auto"):
        if not (root / "config.json").is_file():
            raise UserError(f"{root} is not a model directory (no config.json)")
        self.path = root
        raw = read_json(root / "config.json")
        self.arch = resolve_arch(arch, raw.get("model_type"), raw.get("architectures"))
        gen = root / "generation_config.json"
        self.generation_config = read_json(gen) if gen.is_file() else {}
        self.files = weight_files(root)
        self.config = hf_model_config(self.arch, raw, self.generation_config)
        if not self.has("lm_head.weight"):  # some checkpoints tie without saying so
            self.config.tie_word_embeddings = True

    def has(self, name: str) -> bool:
        return self.arch.hf_name(name).replace("{e}", "0") in self.files

    def get(self, name: str) -> torch.Tensor:
        """Tensor by engine-canonical name; an expert tensor is every expert's, stacked [E, out, in]."""
        source = self.arch.hf_name(name)
        if "{e}" in source:
            return torch.stack([self.raw_tensor(source.replace("{e}", str(e))) for e in range(self.config.num_experts)])
        return self.raw_tensor(source)

    def raw_tensor(self, source: str) -> torch.Tensor:
        """Tensor by the checkpoint's own name."""
        if source not in self.files:
            raise UserError(f"checkpoint {self.path} lacks tensor {source}")
        file = self.files[source]
        if not file.is_file():
            raise UserError(f"checkpoint shard {file} is missing")
        # open per tensor: the mapping is dropped right after, so touched pages of the source do not pile up
        # in our RSS over a whole conversion (the header parse this repeats is tiny next to the copy)
        try:
            with safe_open(file, "pt") as f:
                return f.get_tensor(source)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"cannot read {file}: {e}") from None

    def save_tokenizer(self, dst: Path) -> None:
        if not any((self.path / f).is_file() for f in TOKENIZER_MODELS):
            raise UserError(f"{self.path} has no tokenizer (expected one of {', '.join(TOKENIZER_MODELS)})")
        dst.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, dst / name)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)
