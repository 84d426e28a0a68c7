"""The README's first command (after its pip installs) runs on the shipped fixtures: train, inspect, validate, merge."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_main_command_runs_on_the_fixtures(tmp_path: Path) -> None:
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    steps = [s.strip() for s in block.group(1).split("&&") if s.strip().startswith("loractl ")]
    assert [s.split()[1] for s in steps] == ["train", "inspect", "validate", "merge"]
    loractl = f"{shlex.quote(sys.executable)} -m loractl"
    for step in steps:
        command = step.replace("loractl", loractl, 1).replace("/tmp/loractl-demo", str(tmp_path))
        out = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, (step, out.stderr)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_ci_runs_the_readme_commands_read_from_the_readme_not_copies() -> None:
    """`.ci/run` must run what a newcomer runs: a copy there would drift from the README unnoticed."""
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(blocks) >= 2
    for block in blocks[:2]:
        for step in block.split("&&"):
            if "loractl " in step or "pytest" in step:
                assert step.strip() not in ci, f".ci/run copies {step.strip()!r} instead of reading README.md"
    assert "readme_command 1" in ci and "readme_command 2" in ci


def test_a_test_run_keeps_only_caches_and_failed_tests_temporaries() -> None:
    """A run used to leave 2.4 GB of pytest temporaries (three runs kept) and an undocumented 1.1 GB cache."""
    import tomllib
    from real_model import CACHE

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["tmp_path_retention_policy"] == "failed"
    assert int(options["tmp_path_retention_count"]) <= 1
    readme = (ROOT / "README.md").read_text()
    assert "$LORACTL_TEST_CACHE" in readme and "~/.cache/loractl-tests" in readme
    assert CACHE.name == "loractl-tests" and "LORACTL_TEST_CACHE" in (ROOT / "tests" / "real_model.py").read_text()
