"""The repository root must not shadow installed packages: `python3 -m ...`, `python3 -c` and notebooks put
the current folder first on sys.path, so a folder there with an __init__.py is imported by its bare name.
kernels/, quant/ and runtime/ keep their code in <stage>/src/ for that reason (pyproject.toml says more)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("quant", "kernels", "runtime")


def importable_names(folder: Path) -> set[str]:
    """Names `import X` finds as a regular package or module when `folder` is sys.path[0]."""
    names = {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names | {p.stem for p in folder.glob("*.py")}


# `python3 benchmarks/x.py` puts benchmarks/ first on sys.path, as `python3 -m` does the root
@pytest.mark.parametrize("folder", [".", "benchmarks", "scripts", "deploy", "tests"])
def test_no_folder_scripts_run_from_carries_an_installed_distributions_name(folder):
    owners = importlib.metadata.packages_distributions()  # top-level import name -> distributions providing it
    clashes = {name: owners[name] for name in importable_names(ROOT / folder)
               if set(owners.get(name, [])) - {"lmconvert"}}
    assert not clashes, f"importable from {folder}/, shadowing installed distributions: {clashes}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_folders_are_not_packages(stage):
    assert (ROOT / stage / "src" / "__init__.py").is_file()
    assert not (ROOT / stage / "__init__.py").exists(), f"{stage}/ would be importable as `{stage}` from the root"


def test_transformers_and_pypi_kernels_import_from_the_repository_root():
    """What the issue saw: transformers imports the PyPI `kernels`; from the root it must not get ours."""
    code = ("import importlib.util, transformers; transformers.LlamaConfig\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "if spec is not None:\n"
            "    import kernels\n"
            "print(spec.origin if spec else '')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    origin = done.stdout.strip()
    assert not origin.startswith(str(ROOT)), f"`import kernels` from the root found {origin}"


def test_stage_packages_import_under_lmconvert():
    code = ("import lmconvert.kernels, lmconvert.quant, lmconvert.runtime\n"
            "print(lmconvert.kernels.rms_norm.__module__, lmconvert.quant.quantize.__module__,"
            " lmconvert.runtime.LLMEngine.__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["lmconvert.kernels.norm", "lmconvert.quant.quantize", "lmconvert.runtime.engine"]
