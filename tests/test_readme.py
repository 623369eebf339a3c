"""The README's usage block, run line by line on CPU by scripts/check_readme.py (--quick: the lines that take
minutes, and those that need Qwen3-8B or a GPU, are skipped and named)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_readme  # noqa: E402


def test_usage_block_is_parsed_into_commands():
    lines = check_readme.usage_lines(ROOT / "README.md")
    assert "lmconvert convert llama smollm2 --dst-path ./smol" in lines
    assert all(line.startswith(("lmconvert ", "echo ")) for line in lines), lines


@pytest.mark.slow
def test_readme_usage_lines_run_as_written(smollm2_gguf):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--quick"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout
    for line in check_readme.usage_lines(ROOT / "README.md"):
        assert f"ran      {line}" in report or f"skipped  {line}" in report, line
    assert report.count("ran      ") >= 8  # convert x2, info, quantize --w8, chat x2, generate x2
