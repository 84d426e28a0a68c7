"""The docs say what the program does: every finding code it can emit is in docs/validate.md's table,
and every command page's usage names exactly the options its `--help` has."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from loractl.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGE = {"push": "hub", "pull": "hub", "versions": "hub", "tag": "hub"}  # others: docs/NAME.md


def emitted_codes() -> dict[str, str]:
    """Every finding code in the source (first argument of `error`, `warning`, `Finding`) → where."""
    codes: dict[str, str] = {}
    for path in sorted((ROOT / "loractl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
                continue
            if node.func.id not in ("error", "warning", "Finding") or path.name == "findings.py":
                continue
            first = node.args[0]
            for value in (first.body, first.orelse) if isinstance(first, ast.IfExp) else (first,):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert isinstance(value, ast.Constant) and isinstance(value.value, str), (
                    f"{where}: a finding code must be a literal string, so that this test can see it"
                )
                codes.setdefault(value.value, where)
    return codes


def test_every_finding_code_is_in_the_validate_table() -> None:
    rows = [line.split("|")[1] for line in (DOCS / "validate.md").read_text().splitlines() if line.startswith("| `")]
    table = set(re.findall(r"`([a-z][a-z-]+)`", " ".join(rows)))
    codes = emitted_codes()
    assert len(codes) > 30  # the scan finds the program's codes
    missing = {code: where for code, where in codes.items() if code not in table}
    assert not missing, f"codes missing from docs/validate.md's table: {missing}"
    stale = table - set(codes)
    assert not stale, f"codes in docs/validate.md that nothing emits: {sorted(stale)}"


def usage(name: str) -> str:
    """The usage of `loractl NAME` on its docs page: its line in the first code block and the continuations."""
    text = (DOCS / f"{PAGE.get(name, name)}.md").read_text()
    block = text.split("```")[1]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"loractl {name} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("loractl ")), len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_docs_usage_names_every_option_of_help(name: str) -> None:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    options = [p for p in command.params if isinstance(p, click.Option) and "--help" not in p.opts]
    text = usage(name)
    written = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-zA-Z])(?![\w-])", text))
    absent = [p.opts[-1] for p in options if not written & set(p.opts + p.secondary_opts)]
    assert not absent, f"docs/{PAGE.get(name, name)}.md's usage of {name} lacks {absent}"
    known = {o for p in options for o in p.opts + p.secondary_opts}
    unknown = written - known
    assert not unknown, f"docs/{PAGE.get(name, name)}.md's usage of {name} has options --help lacks: {unknown}"
