"""Issue 23 item 4: a base's fingerprint is hashed once; a second merge of the same base hashes nothing.

The definition is unchanged (the value equals the one hashed afresh), a changed file is hashed again,
and a remembered value that disagrees with an adapter's record is confirmed before it refuses anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from loractl.adapter import Adapter, AdapterMeta
from loractl.errors import IntegrityError
from loractl.io import fingerprint_cache
from loractl.io.checkpoint import Checkpoint
from loractl.ops.merge import merge
from tests.helpers import random_module, save, tiny_base


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every tensor list `Checkpoint` hashes (the reads a remembered fingerprint saves)."""
    calls: list[list[str]] = []
    real = Checkpoint._hash

    def counting(self: Checkpoint, names: list[str], stop: object, scheme: str) -> str:
        calls.append(sorted(names))
        return real(self, names, stop, scheme)  # type: ignore[arg-type]

    monkeypatch.setattr(Checkpoint, "_hash", counting)
    monkeypatch.setenv("LORACTL_CACHE_DIR", str(Path(os.environ["LORACTL_CACHE_DIR"]) / "own"))
    return calls


def _adapter(base: Path, tmp: Path, name: str, fingerprint: str | None = None) -> Path:
    if fingerprint is None:
        with Checkpoint(base) as ckpt:
            fingerprint = ckpt.fingerprint(["lin.weight"], fresh=True)
    modules = {"lin": random_module(6, 5, 2)}
    return save(Adapter(modules=modules, meta=AdapterMeta(base_fingerprint=fingerprint)), tmp / name)


def test_a_second_merge_hashes_nothing(tmp_path: Path, hashes: list[list[str]]) -> None:
    base = tiny_base(tmp_path / "base", {"lin.weight": (6, 5), "other.weight": (3, 3)})
    adapter = _adapter(base, tmp_path, "a")
    shutil.rmtree(fingerprint_cache.cache_dir())  # what making the adapter remembered
    hashes.clear()
    first = merge(base, [adapter], tmp_path / "one")
    assert hashes == [["lin.weight"]]
    second = merge(base, [adapter], tmp_path / "two")
    assert hashes == [["lin.weight"]] and second.fingerprints == first.fingerprints  # nothing hashed again
    with Checkpoint(base) as ckpt:  # the definition is unchanged: the remembered value is the fresh one
        assert ckpt.fingerprint(["lin.weight"], fresh=True) == first.fingerprints[0]


def test_a_changed_base_is_hashed_again(tmp_path: Path, hashes: list[list[str]]) -> None:
    base = tiny_base(tmp_path / "base", {"lin.weight": (6, 5)})
    adapter = _adapter(base, tmp_path, "a")
    merge(base, [adapter], tmp_path / "one")
    tiny_base(base, {"lin.weight": (6, 5)}, seed=1)  # the same name and size, other weights
    hashes.clear()
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(base, [adapter], tmp_path / "two")
    assert hashes and not (tmp_path / "two").exists()
    hashes.clear()
    os.utime(base / "model.safetensors")  # touched: another identity, hashed again
    with pytest.raises(IntegrityError):
        merge(base, [adapter], tmp_path / "two")
    assert hashes


def test_a_remembered_mismatch_is_confirmed(tmp_path: Path, hashes: list[list[str]]) -> None:
    """A wrong remembered value (a file changed under an unchanged identity) never refuses the right base."""
    base = tiny_base(tmp_path / "base", {"lin.weight": (6, 5)})
    adapter = _adapter(base, tmp_path, "a")
    files, names = [base / "model.safetensors"], ["lin.weight"]
    fingerprint_cache.remembered("safetensors", files, names, lambda: "sha256:" + "1" * 64, fresh=True)
    report = merge(base, [adapter], tmp_path / "out")
    assert report.base_notes == () and hashes  # hashed afresh, accepted
    other = _adapter(base, tmp_path, "other", fingerprint="sha256:" + "0" * 64)
    with pytest.raises(IntegrityError):
        merge(base, [other], tmp_path / "out2")


def test_an_unwritable_cache_only_costs_a_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("LORACTL_CACHE_DIR", str(blocked))  # a file where the directory should be
    base = tiny_base(tmp_path / "base", {"lin.weight": (6, 5)}, dtype=torch.bfloat16)
    merge(base, [_adapter(base, tmp_path, "a")], tmp_path / "out")
    assert blocked.read_text() == ""
