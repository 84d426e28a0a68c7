"""Damaged safetensors are named as such, alone or inside an adapter directory, by every reading command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

HINT = "hint: the file is incomplete"


def _damaged(root: Path, fixtures_dir: Path, how: str, inside: str) -> tuple[Path, str]:
    """A cut or empty copy of tiny-qv's weights: alone (`file`) or in the PEFT directory (`peft`)."""
    good = fixtures_dir / "adapters" / "tiny-qv" / "adapter_model.safetensors"
    data = good.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cut = {"empty": b"", "data": data[: len(data) - 100], "header": data[: header - 5]}[how]
    want = {
        "empty": "empty file (0 bytes)",
        "data": f"truncated: the header declares {len(data) - header} data bytes, the file holds {len(data) - header - 100}",
        "header": f"truncated: the header declares {header - 8} header bytes, the file holds {header - 13}",
    }[how]
    if inside == "peft":
        shutil.copytree(fixtures_dir / "adapters" / "tiny-qv", root / "a")
        path = root / "a" / "adapter_model.safetensors"
        path.write_bytes(cut)
        return root / "a", want
    path = root / "a.safetensors"
    path.write_bytes(cut)
    return path, want


@pytest.mark.parametrize("inside", ["file", "peft"])
@pytest.mark.parametrize("how", ["empty", "data", "header"])
def test_damaged_file_is_named(tmp_path: Path, fixtures_dir: Path, how: str, inside: str) -> None:
    path, want = _damaged(tmp_path, fixtures_dir, how, inside)
    for args in (["inspect", path], ["convert", path, "-o", tmp_path / "out", "--to", "kohya"]):
        code, _, err = run_cli(*args)
        assert code == 1 and f"{want}\n" in err and HINT in err, (args, err)
        assert "--from" not in err and "not safetensors" not in err
    assert not (tmp_path / "out").exists()
