"""Every writing command, for every way a write fails: one `error:` + `hint:`, non-zero, nothing left behind.

ENOTDIR and EEXIST are real (a file where the output path needs a directory). EROFS and EACCES
are raised where the kernel raises them, at the first thing created in the output's directory
(the atomic layer's `_prepare`, and `train`'s early `check_writable` probe: tests run as root, so
neither chmod nor a mount can make them; a real EPERM under /sys is in test_merge.py);
ENOSPC where a full disk shows, after the data went into the temporary (`_fsync_tree`): so its
clean-up is tested too. (A real RLIMIT_FSIZE run of each writer is in test_crash_safety.py.)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from loractl.io import atomic
from loractl.io.atomic import TMP_MARKER
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "tiny-llama"
QV = ROOT / "fixtures" / "adapters" / "tiny-qv"
DATA = ROOT / "fixtures" / "data" / "train.jsonl"

COMMANDS: dict[str, Callable[[Path, Path], list[str | Path]]] = {
    "convert": lambda _, out: ["convert", QV, "-o", out, "--to", "kohya"],
    "combine": lambda _, out: ["combine", QV, QV, "-o", out],
    "resize": lambda _, out: ["resize", QV, "-o", out, "--rank", "2"],
    "rescale": lambda _, out: ["rescale", QV, "-o", out, "--scale", "0.5"],
    "extract": lambda work, out: ["extract", BASE, work / "tuned", "-o", out, "--rank", "2"],
    "merge": lambda _, out: ["merge", BASE, QV, "-o", out],
    "pull": lambda work, out: ["pull", f"file://{work}/registry/alice/lora@v1", "-o", out],
    "inspect --plot": lambda _, out: ["inspect", QV, "--plot", out],
    "train": lambda _, out: ["train", "--base", BASE, "--data", DATA, "-o", out, "--steps", "1", "--batch-size", "2"],
}
ERRORS = ("EROFS", "EACCES", "ENOSPC", "ENOTDIR", "EEXIST")
TOLD = {
    "EROFS": "read-only",
    "EACCES": "permission denied",
    "ENOSPC": "no room to write",
    "ENOTDIR": "a file is in the way",
    "EEXIST": "a file is in the way",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs some commands need: a fine-tuned model to extract from, a registry to pull from."""
    root = tmp_path_factory.mktemp("inputs")
    code, _, err = run_cli("merge", BASE, QV, "-o", root / "tuned")
    assert code == 0, err
    code, _, err = run_cli("push", QV, f"file://{root}/registry/alice/lora", "--create", "--tag", "v1")
    assert code == 0, err
    return root


def _inject(monkeypatch: pytest.MonkeyPatch, name: str, where: str) -> None:
    """Make the atomic layer fail with `name` at `where` (`_prepare`, `_create_probe` or `_fsync_tree`)."""
    code = getattr(errno, name)
    original = getattr(atomic, where)

    def failing(path: Path) -> None:
        if where == "_fsync_tree":
            original(path)  # the data was written; the disk fills at the end
        raise OSError(code, os.strerror(code), str(path if where == "_fsync_tree" else path.parent))

    monkeypatch.setattr(atomic, where, failing)


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_write_failure_is_one_error_and_leaves_nothing(
    command: str, error: str, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out_name = "out.png" if command == "inspect --plot" else "out"
    if error == "ENOTDIR":
        out = blocker / "sub" / out_name  # a file in the middle of the path
    elif error == "EEXIST":
        out = blocker / out_name  # a file where the output's directory must be
    else:
        out = tmp_path / "dir" / out_name
        for where in ("_fsync_tree",) if error == "ENOSPC" else ("_prepare", "_create_probe"):
            _inject(monkeypatch, error, where)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    code, _, err = run_cli(*COMMANDS[command](work, out))
    lines = err.strip().splitlines()
    assert code == 1, (code, err)
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), err
    assert TOLD[error] in lines[-2] and "Traceback" not in err, err
    assert TMP_MARKER not in err, err  # the user's path, not a temporary's (a nested one for single files)
    assert not out.exists() and blocker.read_text() == "not a directory"
    left = [p for p in tmp_path.rglob("*") if TMP_MARKER in p.name or p.name.startswith(out_name)]
    if command == "train" and error == "ENOSPC":  # the run trained: its log stays beside the missing adapter
        assert left == [out.parent / "out.train"] and (out.parent / "out.train" / "metrics.jsonl").is_file(), left
    else:
        assert left == [], left
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # inputs untouched


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "command",
    [["convert", "--to", "kohya"], ["convert", "--to", "peft"], ["resize", "--to", "kohya"], ["merge"], ["train"]],
    ids=" ".join,
)
def test_a_directory_that_takes_no_files_is_named_as_the_user_wrote_it(command: list[str], work: Path) -> None:
    """/proc refuses to create anything (ENOENT): one line naming /proc/NAME, not `/proc/..NAME.loractl-tmp-…`."""
    out = Path("/proc") / f"loractl-{os.getpid()}"
    argv = COMMANDS[command[0]](work, out)
    code, _, err = run_cli(*[a for a in argv if a not in ("--to", "kohya")], *command[1:])
    assert code == 1 and "Traceback" not in err, err
    assert err.splitlines() == [
        f"error: cannot write {out}: the directory takes no new files; nothing was written",
        "hint: write the output to an ordinary writable directory",
    ]


def test_force_replaces_a_file_with_an_output_directory(tmp_path: Path) -> None:
    """`-o README.md --force` for a directory output replaces the file, as it replaces a directory with a file."""
    (tmp_path / "README.md").write_text("notes")
    code, _, err = run_cli("convert", QV, "-o", tmp_path / "README.md", "--to", "peft", "--force")
    assert code == 0, err
    assert (tmp_path / "README.md" / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_temporaries_are_shown_as_the_paths_they_become(capsys: pytest.CaptureFixture[str]) -> None:
    """Nested temporaries (a single-file writer inside convert's) and the old-output and probe names all map back."""
    from loractl.cli import main
    from loractl.errors import FormatError

    tmp = f"{TMP_MARKER}123-0abc"
    assert atomic.user_path(f"/d/..k.safetensors{tmp}{tmp}") == Path("/d/k.safetensors")
    assert atomic.user_path(f"/d/.out{TMP_MARKER}9-old-ff/adapter_model.safetensors") == Path(
        "/d/out/adapter_model.safetensors"
    )
    assert atomic.user_path(f"/d/.out{TMP_MARKER}9-probe") == Path("/d/out")
    assert atomic.user_path("/d/.hidden/x") == Path("/d/.hidden/x")

    def failing(*_: object, **__: object) -> None:  # a reader failing on an output being verified
        raise FormatError("cannot read it back", path=f"/d/.out{tmp}/adapter_model.safetensors")

    with pytest.MonkeyPatch.context() as m:
        m.setattr("loractl.cli.inspect_cmd.command.callback", failing)
        with pytest.raises(SystemExit):
            main(["inspect", str(QV)])
    assert capsys.readouterr().err.splitlines()[0] == "error: /d/out/adapter_model.safetensors: cannot read it back"
