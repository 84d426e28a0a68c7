"""Shell completion (click's) as docs/completion.md sets it up: the scripts generate and complete."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _complete(var: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`_LORACTL_COMPLETE=VAR loractl` in a fresh process, as the shell runs it."""
    full = {**os.environ, "_LORACTL_COMPLETE": var, **env}
    return subprocess.run([sys.executable, "-m", "loractl"], capture_output=True, text=True, env=full)


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F _loractl_completion loractl"), ("zsh", "#compdef loractl"),
     ("fish", "complete --no-files --command loractl")],
)  # fmt: skip
def test_completion_script_generates(shell: str, marker: str) -> None:
    out = _complete(f"{shell}_source")
    assert out.returncode == 0, out.stderr
    assert marker in out.stdout and "_LORACTL_COMPLETE" in out.stdout


def test_bash_completes_commands_and_choices() -> None:
    commands = _complete("bash_complete", COMP_WORDS="loractl re", COMP_CWORD="1")
    assert commands.stdout.split() == ["plain,rescale", "plain,resize"]
    formats = _complete("bash_complete", COMP_WORDS="loractl validate x --format ", COMP_CWORD="4")
    assert formats.stdout.split() == ["plain,text", "plain,json", "plain,github"]
