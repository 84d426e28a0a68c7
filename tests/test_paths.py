"""Paths: nothing is written outside the output, and no output ever replaces an input.

* Remote file names that try to escape (`..`, absolute, backslashes) are refused by `pull`
  before anything is written; a registry object swapped for a symlink to a file outside
  fails its hash check.
* A sharded index cannot name shards outside the checkpoint (`..`, absolute, symlinks).
* An output path that is a symlink is replaced as a link, never written through.
* Every writing command refuses an output that is, contains, lies inside or links to one of
  its inputs, even with `--force`, and leaves the input byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES

from loractl.cli import main
from loractl.errors import FormatError
from loractl.io.checkpoint import INDEX_NAME, Checkpoint
from loractl.remote import push
from loractl.remote.store import RepoStore


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else "").encode() + p.read_bytes())
    return h.hexdigest()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Path]:
    """Copies of the fixtures (a bug here must not destroy the real ones) and a fine-tuned checkpoint."""
    from loractl.ops.merge import merge

    base = shutil.copytree(FIXTURES / "tiny-llama", tmp_path / "base")
    adapter = shutil.copytree(FIXTURES / "adapters" / "tiny-qv", tmp_path / "adapters" / "qv")
    other = shutil.copytree(FIXTURES / "adapters" / "tiny-patterns", tmp_path / "adapters" / "patterns")
    merge(base, [adapter], tmp_path / "ft")
    return {"base": base, "adapter": adapter, "other": other, "ft": tmp_path / "ft", "root": tmp_path}


# --- remote names --------------------------------------------------------------------------------

HOSTILE_NAMES = ["../../escape", "/tmp/loractl-absolute-escape", "sub/../../escape", "..\\escape", "a//b", "./x"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_pull_refuses_remote_names_that_escape(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    push(FIXTURES / "adapters" / "tiny-qv", f"file://{root}/alice/lora", create=True)
    RepoStore(root / "alice" / "lora").plant("main", name, b"escape")
    out = tmp_path / "deep" / "er" / "out"
    out.parent.mkdir(parents=True)
    code, err = run(capsys, "pull", f"file://{root}/alice/lora", "-o", str(out))
    assert code == 1 and "outside the output" in err and "hint:" in err
    assert list(out.parent.iterdir()) == []
    assert not (tmp_path / "escape").exists() and not (tmp_path / "deep" / "escape").exists()
    assert not Path("/tmp/loractl-absolute-escape").exists()


def test_pull_does_not_follow_a_registry_symlink_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hostile registry swaps an object for a link to a local secret: its hash check fails, nothing is written."""
    root = tmp_path / "registry"
    push(FIXTURES / "adapters" / "tiny-qv", f"file://{root}/alice/lora", create=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    objects = sorted((root / "alice" / "lora" / "objects").iterdir(), key=lambda p: p.stat().st_size)
    target = objects[-1]  # the weights
    target.unlink()
    target.symlink_to(secret)
    out = tmp_path / "out"
    code, err = run(capsys, "pull", f"file://{root}/alice/lora", "-o", str(out))
    assert code == 1 and "error:" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- sharded indexes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_cannot_name_shards_outside_the_checkpoint(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(FIXTURES / "tiny-llama" / "model.safetensors", outside)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    names = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}
    if kind == "symlink":
        (ckpt / "link.safetensors").symlink_to(outside)
    with Checkpoint(outside) as c:
        weight_map = dict.fromkeys(c.names, names[kind])
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match="outside the checkpoint"):
        Checkpoint(ckpt)


# --- outputs -------------------------------------------------------------------------------------


def test_a_symlinked_output_is_replaced_not_written_through(
    work: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = work["root"] / "elsewhere.safetensors"
    elsewhere.write_bytes(b"precious")
    link = work["root"] / "out.safetensors"
    link.symlink_to(elsewhere)
    code, err = run(capsys, "convert", str(work["adapter"]), "-o", str(link), "--to", "kohya", "--force")
    assert code == 0, err
    assert elsewhere.read_bytes() == b"precious"
    assert not link.is_symlink() and link.stat().st_size > 100


def _commands(w: dict[str, Path]) -> list[tuple[list[str], Path]]:
    """(argv with `-o` last-but-one, the input the output collides with)."""
    a, b, base, ft = (str(w[k]) for k in ("adapter", "other", "base", "ft"))
    data = str(FIXTURES / "data" / "train.jsonl")
    out_cases: list[tuple[list[str], Path]] = []
    for target in (w["adapter"], w["adapter"] / "sub", w["adapter"].parent, w["link"]):
        out_cases += [
            (["merge", base, a, "-o", str(target)], w["adapter"]),
            (["combine", a, b, "--method", "cat", "-o", str(target)], w["adapter"]),
            (["resize", a, "--rank", "2", "-o", str(target)], w["adapter"]),
            (["rescale", a, "--scale", "2", "-o", str(target)], w["adapter"]),
            (["convert", a, "--to", "peft", "-o", str(target)], w["adapter"]),
        ]
    out_cases += [
        (["merge", base, a, "-o", base], w["base"]),
        (["extract", base, ft, "--rank", "4", "-o", ft], w["ft"]),
        (["extract", base, ft, "--rank", "4", "-o", base], w["base"]),
        (["train", "--base", base, "--data", data, "--steps", "1", "-o", base], w["base"]),
    ]
    return out_cases


def test_no_writing_command_overwrites_an_input(work: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    work["link"] = work["root"] / "link-to-adapter"
    work["link"].symlink_to(work["adapter"])
    before = {k: _digest(p) for k, p in work.items() if k != "root"}
    for argv, victim in _commands(work):
        code, err = run(capsys, *argv, "--force")
        assert code == 2, (argv, err)
        assert "would overwrite the input" in err and "hint:" in err, (argv, err)
        assert _digest(victim) == before[next(k for k, p in work.items() if p == victim)], argv
    assert {k: _digest(p) for k, p in work.items() if k != "root"} == before
