"""The docs say what the program does: every finding code it can emit is in docs/validate.md's table,
every command page's usage names exactly the options its `--help` has, docs/architecture.md cites only
files that exist, docs/json.md has every `--json` command, checkpoints are named as train writes them,
the quickstart installs torch as the README does, and each benchmark summary row is dated and sourced."""

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


def test_architecture_cites_only_files_in_the_repo() -> None:
    """Each `file.py` / `file.md` the page names exists: from the root, from loractl/, or from a folder its line names."""
    missing = []
    for line in (DOCS / "architecture.md").read_text().splitlines():
        folders = [ROOT, ROOT / "loractl", *(ROOT / "loractl" / d for d in re.findall(r"`([\w/]+/)`", line))]
        for cited in re.findall(r"(?<![\w/.<>-])[\w/.-]*\w\.(?:py|md)\b", line):
            if not any((folder / cited).is_file() or (DOCS / cited).is_file() for folder in folders):
                missing.append(cited)
    assert not missing, f"docs/architecture.md cites files the repository lacks: {missing}"


def test_json_page_has_a_row_for_every_json_command() -> None:
    rows = [line.split("|")[1] for line in (DOCS / "json.md").read_text().splitlines() if line.startswith("| ")]
    documented = {name.strip() for row in rows for name in row.split(",")}
    with_json = []
    for name in sorted(COMMANDS):
        command = cli.get_command(click.Context(cli), name)
        assert command is not None
        if any("--json" in p.opts for p in command.params):
            with_json.append(name)
    assert len(with_json) > 10
    assert not set(with_json) - documented, f"docs/json.md lacks {sorted(set(with_json) - documented)}"


def test_quickstart_installs_torch_as_the_readme_does() -> None:
    readme = set(re.findall(r"pip install torch\S*", (ROOT / "README.md").read_text()))
    quickstart = set(re.findall(r"pip install torch\S*", (DOCS / "quickstart.md").read_text()))
    assert len(readme) == 1 and quickstart == readme


def test_checkpoint_directories_are_named_as_train_writes_them() -> None:
    """`step-000020` (six digits, as tests/test_train_cli.py sees on disk), never `step-N`, in docs and --help."""
    from click.testing import CliRunner

    texts = {page.name: page.read_text() for page in DOCS.glob("*.md")}
    texts["train --help"] = CliRunner().invoke(cli, ["train", "--help"]).output
    names = {where: re.findall(r"step-[\w{}]+", text) for where, text in texts.items()}
    wrong = {where: found for where, found in names.items() if any(not re.fullmatch(r"step-\d{6}", n) for n in found)}
    assert not wrong
    assert names["train.md"] and names["train --help"]


def test_benchmark_summary_rows_each_carry_one_dated_figure_machine_and_command() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    machines = set(re.findall(r"^\| \*\*(\w)\*\* \|", text, re.M))
    summary = text.split("## Summary against the goals the issues set")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in summary.splitlines() if line.startswith("| `")]
    assert len(rows) > 15 and machines
    for command, goal, figure, date, machine, run, met in rows:
        assert re.match(r"20\d\d-\d\d-\d\d", date) and machine in machines and run, (command, goal)
        assert figure and met and "; " not in date, (command, goal)
    assert "## History of the summary" in text
