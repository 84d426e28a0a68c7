"""Run the CLI in-process the way a user's shell does: through `main`, with its error rendering."""

from __future__ import annotations

import pytest

from loractl.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `loractl ARGV...`."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
