"""A hostile or damaged registry cannot exhaust the machine nor blame the user (issue 27 items 1-3, 5, 6).

The repositories come from `hostile_registry.build` (seeded). Every command runs through the real
CLI entry point: one `error:` line and a `hint:`, nothing at the output, nothing left beside it,
in bounded time (a `/dev/zero` object used to be copied until the disk was full).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_runner import run
from hostile_registry import ADAPTER, LIES, Case, build

from loractl.errors import OutputWriteError
from loractl.formats import load_adapter
from loractl.io.atomic import TMP_MARKER
from loractl.remote import RegistryDamagedError, push
from loractl.remote.store import RepoStore

ROOT = Path(__file__).resolve().parent.parent
SEED = 27


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {c.name: c for c in build(tmp_path_factory.mktemp("registry"), SEED)}


def _one_line(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 2, err
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    return lines


@pytest.mark.parametrize("name", list(LIES))
def test_a_hostile_registry_is_refused_in_one_line(
    name: str, hostile: dict[str, Case], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = hostile[name]
    out = tmp_path / "out"
    argv = ["pull", case.repo, "-o", str(out)] if case.command == "pull" else ["versions", case.repo]
    started = time.monotonic()
    code, _, err = run(capsys, *argv)
    assert time.monotonic() - started < 10, name
    assert code == 1, (name, err)
    error, hint = _one_line(err)
    assert case.says in error, (name, err)
    assert "pull again" not in hint, err  # a file:// registry is not a download: say it is damaged
    assert list(tmp_path.iterdir()) == [], name


def test_the_damage_is_seeded(hostile: dict[str, Case], tmp_path: Path) -> None:
    for a, b in zip(hostile.values(), build(tmp_path, SEED), strict=True):
        sa, sb = (RepoStore(Path(c.repo.removeprefix("file://"))) for c in (a, b))
        assert sorted(p.name for p in (sa.path / "objects").iterdir()) == sorted(
            p.name for p in (sb.path / "objects").iterdir()
        ), a.name


def test_history_that_loops_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the hash check (a record that hashes to its name cannot be its own parent), the walk itself
    keeps a visited set: a loop ends at once."""
    store = RepoStore(tmp_path / "alice" / "lora")
    store.create(private=False)
    head = store.resolve("main")
    doc = store._commit_doc(head)
    monkeypatch.setattr(RepoStore, "_commit_doc", lambda self, sha: {**doc, "parent": head})
    with pytest.raises(RegistryDamagedError, match="loops back"):
        list(store.log(head))


@pytest.mark.parametrize(
    "argv",
    [
        ["pull", "{repo}@%2Fetc%2Fhostname", "-o", "{out}"],
        ["pull", "{repo}@..%2F..%2Fcommits", "-o", "{out}"],
        ["versions", "{repo}", "--branch", "/etc/hostname"],
        ["versions", "{repo}", "--branch", "../../objects"],
    ],
)
def test_a_revision_that_is_a_path_is_not_found(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    push(ADAPTER, repo, create=True)
    code, _, err = run(capsys, *(a.format(repo=repo, out=tmp_path / "out") for a in argv))
    assert code == 1 and "no branch" in _one_line(err)[0], err
    assert not (tmp_path / "out").exists()


def test_pulling_the_first_commit_says_it_holds_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    first = push(ADAPTER, repo, create=True).parent  # the repository's initial commit
    code, _, err = run(capsys, "pull", f"{repo}@{first}", "-o", str(tmp_path / "out"))
    error, _ = _one_line(err)
    assert code == 2 and "holds no file" in error and "--include" not in error, err


def _limited(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a full disk, as the kernel reports a quota


def _cli(*argv: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loractl", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=(lambda: _limited(limit)) if limit else None,
        timeout=120,
    )


@contextmanager
def _disk_full_after(limit: int) -> Iterator[None]:
    """In this process: files cannot grow past `limit` bytes (EFBIG, which loractl reports as no room)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_push_into_a_full_registry_leaves_nothing_and_names_the_path(tmp_path: Path) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    push(ROOT / "fixtures" / "adapters" / "tiny-patterns", repo, create=True)
    load_adapter(ADAPTER)  # torch and the adapter read before the disk fills
    with pytest.raises(OutputWriteError) as full, _disk_full_after(2048):  # the weights object is larger
        push(ADAPTER, repo)
    assert "no room to write" in str(full.value) and f"{tmp_path}/registry/alice/lora/objects/" in str(full.value)
    leftovers = [p for p in (tmp_path / "registry").rglob("*") if p.name.startswith(".") or TMP_MARKER in p.name]
    assert leftovers == []
    push(ADAPTER, repo)
    assert [p for p in (tmp_path / "registry").rglob("*") if p.name.startswith(".")] == []


def test_a_pull_out_of_space_names_the_output_not_the_registry(tmp_path: Path) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    push(ADAPTER, repo, create=True)
    out = tmp_path / "work" / "out"
    full = _cli("pull", repo, "-o", str(out), limit=2048)
    assert full.returncode == 1, full.stderr
    error, _ = _one_line(full.stderr)
    assert f"no room to write {out}" in error and "objects" not in error, full.stderr
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("command", ["pull", "merge"])
def test_force_replaces_a_link_to_a_directory_as_a_link(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/reliability.md: an output that is a symlink is replaced as a link; its target is never written."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    repo = f"file://{tmp_path}/registry/alice/lora"
    if command == "pull":
        push(ADAPTER, repo, create=True)
        argv = ["pull", repo, "-o", str(link), "--force"]
    else:
        argv = ["merge", str(ROOT / "fixtures" / "tiny-llama"), str(ADAPTER), "-o", str(link), "--force"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert link.is_dir() and not link.is_symlink()
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]
