"""Running the CLI in-process and checking the one-line error contract (shared by the CLI test files)."""

from __future__ import annotations

from click.testing import CliRunner

from lmconvert.cli import main


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_one_line_error(result, *fragments):
    """exit 1, exactly one `error: ...` line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
