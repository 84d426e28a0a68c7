"""merge and validate recognise the adapter's base in another floating dtype; --allow-base-mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loractl.errors import IntegrityError
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.extract import ExtractConfig, extract
from loractl.ops.merge import merge
from loractl.validation import validate_adapter
from tests.helpers import run_cli, tiny_base

SHAPES = {"a.weight": (24, 16), "b.weight": (16, 24), "norm.weight": (16,)}


def _extracted(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """A base in `dtype` and an adapter extracted against it (which records the base fingerprint)."""
    base = tiny_base(root / "base", SHAPES, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    with Checkpoint(base) as ckpt:
        tuned = {n: ckpt.get(n) for n in ckpt.names}
    for n in ("a.weight", "b.weight"):
        rows, cols = tuned[n].shape
        tuned[n] = (tuned[n].float() + torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)).to(dtype)
    (root / "tuned").mkdir()
    save_tensors(root / "tuned" / "model.safetensors", tuned)
    extract(base, root / "tuned", root / "adapter", ExtractConfig(rank=2))
    return base, root / "adapter"


def _copy(base: Path, out: Path, dtype: torch.dtype, nudge: float = 0.0) -> Path:
    with Checkpoint(base) as ckpt:
        tensors = {n: (ckpt.get(n).double() * (1 + nudge)).to(dtype) for n in ckpt.names}
    out.mkdir()
    save_tensors(out / "model.safetensors", tensors)
    return out


@pytest.mark.parametrize(
    ("made", "copy"),
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_the_same_base_in_another_dtype_is_accepted(tmp_path: Path, made: torch.dtype, copy: torch.dtype) -> None:
    base, adapter = _extracted(tmp_path, made)
    copied = _copy(base, tmp_path / "copy", copy)
    report = merge(copied, [adapter], tmp_path / "out")
    assert report.base_notes == (f"{adapter}: this base holds the adapter's base weights in another floating dtype",)
    assert not [f for f in validate_adapter(adapter, base=copied).findings if f.code == "base-fingerprint"]


def test_other_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    """Control: weights changed by 1e-3 relative, in the same and in another dtype, are another base."""
    base, adapter = _extracted(tmp_path, torch.float32)
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        other = _copy(base, tmp_path / f"other{i}", dtype, nudge=1e-3)
        with pytest.raises(IntegrityError, match="made for another base") as e:
            merge(other, [adapter], tmp_path / "out")
        assert "--allow-base-mismatch" in (e.value.hint or "") and not (tmp_path / "out").exists()
        assert [f.code for f in validate_adapter(adapter, base=other).findings] == ["base-fingerprint"]
    code, _, err = run_cli("merge", tmp_path / "other1", adapter, "-o", tmp_path / "out")
    assert code == 1 and "error:" in err and "--allow-base-mismatch" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli("merge", tmp_path / "other1", adapter, "-o", tmp_path / "out", "--allow-base-mismatch")
    assert code == 0 and "made for another base" in err and "merged anyway" in err
    assert (tmp_path / "out" / "model.safetensors").exists()
