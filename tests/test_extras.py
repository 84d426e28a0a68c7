"""Each pip extra carries what its commands import, and a missing package is named with its extra.

The fresh-venv proof is `.ci/run`, which runs the README's first command in a venv holding only
what that command installs; these tests pin the table that the commands check against.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from cli_runner import run

import loractl.errors
import loractl.extras
from loractl.extras import EXTRAS

ROOT = Path(__file__).resolve().parent.parent


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_every_extra_carries_the_packages_its_commands_check(extra: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["optional-dependencies"][extra]) | _requirement_names(project["dependencies"])
    assert set(EXTRAS[extra]) <= declared


def _without(monkeypatch: pytest.MonkeyPatch, *absent: str) -> None:
    real = loractl.extras.find_spec
    monkeypatch.setattr(loractl.extras, "find_spec", lambda name: None if name in absent else real(name))


@pytest.mark.parametrize("command", ["train", "eval"])
def test_missing_accelerate_is_named_with_the_extra_and_the_command(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before: transformers' ValueError about device_map, rendered as "cannot load base" with a base hint."""
    _without(monkeypatch, "accelerate")
    base, data = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "data" / "train.jsonl"
    argv = {
        "train": ["train", "--base", str(base), "--data", str(data), "-o", str(tmp_path / "out"), "--steps", "1"],
        "eval": ["eval", str(base), "--data", str(data)],
    }[command]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert f"error: {command} needs accelerate, which is not installed" in err
    assert "hint: pip install 'loractl[train]'" in err
    assert not (tmp_path / "out").exists()


def test_missing_packages_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "bitsandbytes", "accelerate")
    with pytest.raises(loractl.errors.UsageError, match=r"--quantize needs accelerate, bitsandbytes, which are not"):
        loractl.extras.require_extra("qlora", purpose="--quantize")
