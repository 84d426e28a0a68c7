"""LoHa/LoKr read as their exact LoRA, against the dense formulas of FORMATS.md §8 (no lycoris needed;
tests/test_interop_lycoris.py holds loractl to LyCORIS' own modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loractl.formats import describe_adapter, load_adapter
from loractl.io.safetensors_writer import save_tensors

NAME = "lycoris_model_layers_0_mlp_down_proj"


def _file(
    tmp_path: Path, tensors: dict[str, tuple[int, ...]], alpha: float | None
) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(len(tensors))
    t = {k: torch.randn(*s, generator=g, dtype=torch.float64).float() for k, s in tensors.items()}
    full = {f"{NAME}.{k}": v for k, v in t.items()}
    if alpha is not None:
        full[f"{NAME}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "a.safetensors"
    save_tensors(path, full, {})
    return path, {k: v.double() for k, v in t.items()}


def _check(path: Path, expected: torch.Tensor, rank: int) -> None:
    m = load_adapter(path).modules["model.layers.0.mlp.down_proj"]
    got = m.delta_weight(torch.float64)
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    assert m.rank == rank == describe_adapter(path).modules["model.layers.0.mlp.down_proj"].rank
    assert m.alpha == pytest.approx(m.scale * m.rank)  # so writers that store alpha/rank keep the scale


@pytest.mark.parametrize(("alpha", "scale"), [(2.0, 2.0 / 3), (None, 1.0), (0.0, 1.0)])
def test_loha_is_the_hadamard_product(tmp_path: Path, alpha: float | None, scale: float) -> None:
    """(w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = hada_w1_b's rows; alpha missing or 0 means scale 1; rank r1·r2."""
    shapes = {"hada_w1_a": (40, 3), "hada_w1_b": (3, 30), "hada_w2_a": (40, 2), "hada_w2_b": (2, 30)}
    path, t = _file(tmp_path, shapes, alpha)
    expected = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    _check(path, expected, 6)


def test_loha_as_wide_as_the_matrix_is_held_dense(tmp_path: Path) -> None:
    """r1·r2 ≥ min(out, in): the dense ΔW times an identity, rank min(out, in)."""
    shapes = {"hada_w1_a": (12, 4), "hada_w1_b": (4, 20), "hada_w2_a": (12, 4), "hada_w2_b": (4, 20)}
    path, t = _file(tmp_path, shapes, 4.0)
    _check(path, (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]), 12)


def test_lokr_full_w1_lowrank_w2(tmp_path: Path) -> None:
    """kron(w1, w2a·w2b) · alpha/r with r = lokr_w2_b's rows; rank = min(w1's sides) · r."""
    shapes = {"lokr_w1": (4, 2), "lokr_w2_a": (10, 3), "lokr_w2_b": (3, 16)}
    path, t = _file(tmp_path, shapes, 6.0)
    expected = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 2.0
    _check(path, expected, 6)


def test_lokr_full_full_has_scale_one_whatever_alpha(tmp_path: Path) -> None:
    """Both sides full: LyCORIS and ComfyUI apply scale 1, whatever the file's alpha."""
    shapes = {"lokr_w1": (2, 3), "lokr_w2": (8, 5)}
    path, t = _file(tmp_path, shapes, 9.0)
    _check(path, torch.kron(t["lokr_w1"], t["lokr_w2"]), 10)


def test_lokr_both_sides_lowrank(tmp_path: Path) -> None:
    """kron(w1a·w1b, w2a·w2b) · alpha/r, r = lokr_w1_b's rows; rank r·r."""
    shapes = {"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 5), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 9)}
    path, t = _file(tmp_path, shapes, 1.0)
    expected = torch.kron(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 0.5
    _check(path, expected, 4)


def test_factors_that_do_not_multiply_are_a_finding(tmp_path: Path) -> None:
    shapes = {"hada_w1_a": (40, 3), "hada_w1_b": (4, 30), "hada_w2_a": (40, 2), "hada_w2_b": (2, 30)}
    path, _ = _file(tmp_path, shapes, 1.0)
    [finding] = describe_adapter(path).findings
    assert finding.code == "lycoris-shape" and "do not multiply" in finding.render()
