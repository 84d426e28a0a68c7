"""The docs' shell blocks run as written: docs/quickstart.md and docs/ci.md, in a scratch directory.

A `bash` block runs unless the line before it says `<!-- quickstart-test: skip (why) -->`; one marked
`<!-- quickstart-test: slow -->` runs only in the slow test. The fast subset runs in the default suite,
so it must not depend on a slow block's output (running it alone checks that too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:<!-- quickstart-test: (?P<mark>\w+)[^>]*-->\n)?```bash\n(?P<code>.*?)```", re.S)


def blocks(page: str, *, slow: bool) -> list[str]:
    """The runnable bash blocks of `page`, in order; the slow ones only when `slow`."""
    found = []
    for m in BLOCK.finditer((DOCS / page).read_text()):
        mark = m.group("mark")
        assert mark in (None, "skip", "slow"), f"{page}: unknown mark {mark!r}"
        if mark is None or (mark == "slow" and slow):
            found.append(m.group("code"))
    return found


def run_blocks(page: str, work: Path, *, slow: bool) -> None:
    """Each block in one `bash -euo pipefail` at `work`, with fixtures/ and `loractl` as in a checkout."""
    (work / "fixtures").symlink_to(ROOT / "fixtures")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    (bin_dir / "loractl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m loractl "$@"\n')
    (bin_dir / "loractl").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COLUMNS": "100"}
    env.pop("LORACTL_DEBUG", None)
    for code in blocks(page, slow=slow):
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, f"{page} block failed:\n{code}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
        assert "Traceback" not in out.stderr


def test_quickstart_fast_blocks(tmp_path: Path) -> None:
    run_blocks("quickstart.md", tmp_path, slow=False)
    assert (tmp_path / "tiny-lora-v1" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_ci_page_blocks(tmp_path: Path) -> None:
    run_blocks("ci.md", tmp_path, slow=False)


def test_every_quickstart_step_is_tested() -> None:
    """Install is the only block skipped; the fast subset covers inspect, validate, the registry and CI."""
    text = (DOCS / "quickstart.md").read_text()
    assert text.count("quickstart-test: skip") == 1
    fast = "\n".join(blocks("quickstart.md", slow=False))
    for command in ("inspect", "validate", "push", "versions", "pull", "--format github"):
        assert f"{command}" in fast, command
    every = "\n".join(blocks("quickstart.md", slow=True))
    for command in ("train", "merge", "extract", "convert", "--plot"):
        assert f"loractl {command}" in every or command in every, command


@pytest.mark.slow
def test_quickstart_all_blocks(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    run_blocks("quickstart.md", tmp_path, slow=True)
    for made in ("my-lora", "merged", "extracted", "extracted-r4", "tiny-qv-peft", "tiny-lora-v1"):
        assert (tmp_path / made).is_dir(), made
    assert (tmp_path / "layers.png").stat().st_size > 10_000 and (tmp_path / "spectra.png").stat().st_size > 10_000


def test_doc_links_resolve() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists.

    docs/benchmarks.md is the one page made at release time, from the docs/benchmarks-*.md files.
    """
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or (page.parent / target).exists():
                continue
            if target.endswith("benchmarks.md") and list(DOCS.glob("benchmarks-*.md")):
                continue
            missing.append(f"{page.relative_to(ROOT)} → {target}")
    assert not missing, missing


def test_readme_lists_every_command() -> None:
    from loractl.cli import COMMANDS

    table = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"| `loractl {name} " in table, name
