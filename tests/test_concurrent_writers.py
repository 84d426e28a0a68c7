"""Writers racing for one output: without --force exactly one succeeds, every other gets 'already exists'.

The output-exists check at the start of a command is a courtesy; the final rename decides
(`atomic.claim`: renameat2(RENAME_NOREPLACE), or a link / mkdir claim). The default tests race
real processes that hold their finished temporaries until every one of them has passed the
start check (so the race is certain, not lucky); the slow test starts real `loractl merge`s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loractl.errors import OutputExistsError
from loractl.io import atomic
from loractl.io.atomic import TMP_MARKER, atomic_output

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "tiny-llama"
ADAPTERS = [ROOT / "fixtures" / "adapters" / n for n in ("tiny-qv", "tiny-patterns", "tiny-dora")]

# One writer: fill a temporary with its own id, wait until all N writers have theirs, then commit.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from loractl.errors import OutputExistsError
    from loractl.io import atomic
    final, gate, me, n, kind, fallback = sys.argv[1:7]
    if fallback == "1":
        atomic._renameat2 = lambda: None  # a kernel or file system without RENAME_NOREPLACE
    try:
        with atomic.atomic_output(final) as tmp:
            if kind == "dir":
                tmp.mkdir()
                (tmp / "who").write_text(me)
            else:
                tmp.write_text(me)
            Path(gate, me).touch()
            deadline = time.monotonic() + 20
            while len(os.listdir(gate)) < int(n) and time.monotonic() < deadline:
                time.sleep(0.005)
    except OutputExistsError:
        sys.exit(2)
    """
)


def _race(tmp_path: Path, rnd: int, kind: str, n: int, fallback: bool) -> tuple[list[int], Path]:
    final, gate = tmp_path / f"out-{kind}-{rnd}", tmp_path / f"gate-{kind}-{rnd}"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(final), str(gate), str(i), str(n), kind, "1" if fallback else "0"],
            env=env,
        )
        for i in range(n)
    ]
    return [p.wait(timeout=60) for p in procs], final


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "link-mkdir"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_exactly_one_of_racing_writers_succeeds(tmp_path: Path, kind: str, fallback: bool) -> None:
    for rnd in range(2):
        codes, final = _race(tmp_path, rnd, kind, 3, fallback)
        assert sorted(codes) == [0, 2, 2], codes
        winner = str(codes.index(0))
        assert (final / "who" if kind == "dir" else final).read_text() == winner  # the one that exited 0
        assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]  # every loser cleaned up


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "link-mkdir"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_an_output_that_appears_while_writing_is_never_replaced(
    tmp_path: Path, kind: str, fallback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fallback:
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="already exists"), atomic_output(final) as tmp:
        if kind == "dir":
            tmp.mkdir()
        else:
            tmp.write_text("mine")
        final.write_text("someone else's")  # another writer finished first
    assert final.read_text() == "someone else's"
    assert list(tmp_path.iterdir()) == [final]


def test_a_dangling_link_is_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError), atomic_output(tmp_path / "out") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_racing_merges_into_one_output(tmp_path: Path) -> None:
    """The issue's case: three `loractl merge`s with different adapters into one -o, started together."""
    for rnd in range(8):
        out = tmp_path / f"merged-{rnd}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "loractl", "merge", str(BASE), str(a), "-o", str(out)],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for a in ADAPTERS
        ]
        results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
        codes = [c for c, _ in results]
        assert sorted(codes) == [0, 2, 2], results
        assert all("already exists" in err and err.count("\n") == 2 for c, err in results if c == 2)
        assert (out / "model.safetensors").is_file() or any(out.glob("*.safetensors"))
        assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]
        time.sleep(0.1)


def test_without_hard_links_a_file_is_claimed_by_an_exclusive_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without renameat2's flag nor hard links (vfat, some FUSE): still never replaced."""

    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    monkeypatch.setattr(os, "link", no_links)
    with atomic_output(tmp_path / "out") as tmp:
        tmp.write_text("first")
    with pytest.raises(OutputExistsError), atomic_output(tmp_path / "late") as tmp:
        tmp.write_text("mine")
        (tmp_path / "late").write_text("someone else's")
    assert (tmp_path / "out").read_text() == "first" and (tmp_path / "late").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "out"]
