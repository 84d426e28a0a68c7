"""docs/api.md runs as written: its `python` blocks, in order, in one namespace, in a scratch directory.

A comment line `# …` right after a `print(...)` (or after another such line) is the expected output;
each block's stdout must be exactly those lines. Blocks marked `<!-- quickstart-test: slow -->` run
only in the slow test.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- quickstart-test: (?P<mark>\w+)[^>]*-->\n)?```python\n(?P<code>.*?)```", re.S)


def api_blocks(*, slow: bool) -> list[tuple[str, list[str]]]:
    """(code, expected stdout lines) for each runnable block of docs/api.md."""
    found = []
    for m in BLOCK.finditer((ROOT / "docs" / "api.md").read_text()):
        if m.group("mark") == "slow" and not slow:
            continue
        expected, after_print = [], False
        for line in m.group("code").splitlines():
            if after_print and line.startswith("# "):
                expected.append(line[2:])
                continue
            after_print = line.lstrip().startswith("print(")
        found.append((m.group("code"), expected))
    return found


def run_api_doc(work: Path, monkeypatch: pytest.MonkeyPatch, *, slow: bool) -> None:
    (work / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {"__name__": "api_doc"}
    for code, expected in api_blocks(slow=slow):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/api.md", "exec"), namespace)
        assert out.getvalue().splitlines() == expected, code


def test_api_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    run_api_doc(tmp_path, monkeypatch, slow=False)
    assert (tmp_path / "spectra.png").is_file() and (tmp_path / "tiny-lora-v1").is_dir()


def test_every_print_has_its_output() -> None:
    for code, expected in api_blocks(slow=True):
        assert code.count("print(") <= len(expected), code


@pytest.mark.slow
def test_api_doc_runs_with_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    run_api_doc(tmp_path, monkeypatch, slow=True)
