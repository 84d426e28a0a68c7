"""The pre-commit hook and the GitHub action run `loractl validate` the way the docs say."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _loractl(entry: str) -> list[str]:
    """The hook's entry with `loractl` replaced by this interpreter's module (no PATH assumptions)."""
    words = shlex.split(entry)
    assert words[0] == "loractl"
    return [sys.executable, "-m", "loractl", *words[1:]]


def test_pre_commit_hook_runs_on_fixture_files(fixtures_dir: Path) -> None:
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    import re

    files = [p for p in sorted((fixtures_dir / "adapters").rglob("*")) if re.search(hook["files"], p.name)]
    assert len(files) >= 6
    out = subprocess.run([*_loractl(hook["entry"]), *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pre_commit_hook_fails_on_a_broken_adapter(fixtures_dir: Path, tmp_path: Path) -> None:
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    bad = tmp_path / "adapter_model.safetensors"
    bad.write_bytes((fixtures_dir / "adapters" / "tiny-qv" / "adapter_model.safetensors").read_bytes()[:-8])
    (tmp_path / "adapter_config.json").write_text(
        (fixtures_dir / "adapters" / "tiny-qv" / "adapter_config.json").read_text()
    )
    out = subprocess.run([*_loractl(hook["entry"]), str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "truncated" in out.stdout


@pytest.mark.parametrize("strict", ["false", "true"])
def test_action_validate_step_prints_annotations(fixtures_dir: Path, tmp_path: Path, strict: str) -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    step = next(s for s in action["runs"]["steps"] if s.get("name") == "Validate")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "loractl"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m loractl "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LORACTL_PATHS": str(fixtures_dir / "adapters" / "tiny-qv") + " " + str(tmp_path / "missing"),
        "LORACTL_BASE": str(fixtures_dir / "tiny-llama"),
        "LORACTL_STRICT": strict,
    }
    out = subprocess.run(["bash", "-c", step["run"]], capture_output=True, text=True, env=env)
    assert out.returncode == 2  # a missing path is a usage error; the other paths are still annotated
    assert out.stdout.startswith("::error file=") and "missing" in out.stdout
