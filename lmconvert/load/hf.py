"""Hugging Face / ModelScope checkpoint directories: config.json + (sharded) safetensors, read tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lmconvert.arch import resolve_arch
from lmconvert.config import check_generation_config, check_tensor, expected_shape
from lmconvert.errors import UserError, first_line
from lmconvert.load.hparams import hf_model_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_json(path: Path) -> dict:
    """A JSON object from path (config.json, generation_config.json, the index, tokenizer configs)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise UserError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object (it holds a {type(data).__name__})")
    return data


def safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except SafetensorError as e:  # a damaged header: lengths, offsets, dtypes, shapes
        raise UserError(f"cannot read {file}: {str(e).strip().splitlines()[0]}") from None


def weight_files(root: Path) -> dict[str, Path]:
    """Source tensor name -> safetensors file holding it."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: weight_map must map tensor names to file names")
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
        names.update(dict.fromkeys(safetensors_keys(file), file))
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
        check_generation_config(self.generation_config, str(gen))
        self.files = weight_files(root)
        self.config = hf_model_config(self.arch, raw, self.generation_config)
        last = self.config.num_layers - 1
        if not self.has(f"layers.{last}.input_norm.weight"):
            raise UserError(f"{root}: config.json says {last + 1} layers, the checkpoint has no tensors for layer {last}")
        if not self.has("lm_head.weight"):  # some checkpoints tie without saying so
            self.config.tie_word_embeddings = True

    def has(self, name: str) -> bool:
        return self.arch.hf_name(name).replace("{e}", "0") in self.files

    def get(self, name: str) -> torch.Tensor:
        """Tensor by engine-canonical name; an expert tensor is every expert's, stacked [E, out, in]."""
        source = self.arch.hf_name(name)
        if "{e}" in source:
            want = expected_shape(self.config, name)
            experts = [self.raw_tensor(source.replace("{e}", str(e))) for e in range(self.config.num_experts)]
            for e, t in enumerate(experts):
                if want is not None and tuple(t.shape) != want[1:]:
                    raise UserError(f"checkpoint {self.path}: tensor {source.replace('{e}', str(e))} has shape "
                                    f"{list(t.shape)}, the config says {list(want[1:])}")
            tensor = torch.stack(experts)
        else:
            tensor = self.raw_tensor(source)
        check_tensor(self.config, name, tensor, f"checkpoint {self.path}")
        return tensor

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
        return load_hf_tokenizer(self.path)


TOKENIZER_JSONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.json")


def load_hf_tokenizer(path: Path):
    """AutoTokenizer of a checkpoint's (or an engine's) tokenizer files; a damaged one is a one-line UserError."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_JSONS:
        if (path / name).is_file():
            read_json(path / name)  # bad syntax, deep nesting, not an object: named here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.decode(tokenizer("Hello 1")["input_ids"])  # what every prompt goes through
        return tokenizer
    except Exception as e:  # transformers raises assorted errors for a damaged tokenizer; tokenizers (Rust) a bare Exception
        raise UserError(f"cannot load the tokenizer in {path}: {first_line(e)}") from None
