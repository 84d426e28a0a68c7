"""docs/cli.md is the commands' `--help`, and every `--help` teaches by example."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from cli_runner import run

from loractl.cli import COMMANDS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help() -> None:
    gen = _generator()
    assert (DOCS / "cli.md").read_text() == gen.render(), "docs/cli.md is stale: run python docs/gen_cli.py"


def test_cli_reference_covers_every_command() -> None:
    text = (DOCS / "cli.md").read_text()
    assert re.findall(r"^## loractl (\w+)$", text, re.M) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_an_example(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's help has an Examples block whose lines are runnable `loractl NAME …` invocations."""
    code, out, _ = run(capsys, name, "--help")
    assert code == 0
    block = out.split("Examples:", 1)
    assert len(block) == 2, f"loractl {name} --help has no Examples"
    examples = re.findall(r"^\s+(loractl .*)$", block[1].split("Options:", 1)[0], re.M)
    assert examples and all(e.startswith(f"loractl {name} ") for e in examples), examples
