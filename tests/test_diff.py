"""diff: every figure against a dense float64 computation of ΔW, the module bookkeeping, bad input,
the CLI (text, --json, --plot) and registry references."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loractl.adapter import Adapter, LoraModule
from loractl.errors import ShapeMismatchError, UsageError
from loractl.formats import load_adapter, save_adapter
from loractl.ops.diff import diff, diff_module
from tests.helpers import random_module, run_cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "adapters"


def dense(m: LoraModule) -> torch.Tensor:
    """ΔW in factor layout (out, in_flat), float64, formed directly: the independent reference."""
    return m.scale * (m.B.double().flatten(1) @ m.A.double().flatten(1))


def dense_overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cos² of the principal angles between the column spaces, from dense SVDs."""
    bases = []
    for d in (x, y):
        u, s, _ = torch.linalg.svd(d, full_matrices=False)
        bases.append(u[:, : int((s > s[0] * 1e-9).sum())])
    cos = torch.linalg.svdvals(bases[0].T @ bases[1])
    return float((cos**2).sum()) / min(bases[0].shape[1], bases[1].shape[1])


def check_against_dense(a: LoraModule, b: LoraModule) -> None:
    x, y = dense(a), dense(b)
    got = diff_module("m", a, b)
    assert got.norm_a == pytest.approx(float(x.norm()), rel=1e-9)
    assert got.change == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-6, abs=1e-12)
    assert got.cosine == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())), abs=1e-6)
    assert got.overlap == pytest.approx(dense_overlap(x, y), abs=1e-6)


@given(st.integers(2, 24), st.integers(2, 24), st.integers(1, 8), st.integers(1, 8), st.integers(0, 10_000))
def test_figures_equal_dense_computation(out: int, inp: int, ra: int, rb: int, seed: int) -> None:
    a = random_module(out, inp, ra, seed=seed)
    b = random_module(out, inp, rb, seed=seed + 1, alpha=float(rb))
    check_against_dense(a, b)


@pytest.mark.parametrize("eps", [1e-3, 1e-6])
def test_nearly_equal_versions_keep_their_small_change(eps: float) -> None:
    # a Gram expansion ‖A‖² + ‖B‖² − 2⟨A, B⟩ would lose these to cancellation; the QR core does not
    a = random_module(32, 24, 6, seed=3)
    g = torch.Generator().manual_seed(4)
    b = replace(a, B=a.B.double() + eps * torch.randn(a.B.shape, generator=g, dtype=torch.float64))
    check_against_dense(replace(a, B=a.B.double(), A=a.A.double()), b)
    assert diff_module("m", a, b).change == pytest.approx(
        float((dense(a) - dense(b)).norm() / dense(a).norm()), rel=1e-6
    )


def test_conv_embedding_and_conv1d_modules_against_dense() -> None:
    g = torch.Generator().manual_seed(0)
    conv = LoraModule(A=torch.randn(3, 4, 3, 3, generator=g), B=torch.randn(6, 3, 1, 1, generator=g), scale=0.5,
                      kind="conv")  # fmt: skip
    conv2 = replace(conv, A=torch.randn(3, 4, 3, 3, generator=g))
    check_against_dense(conv, conv2)
    emb = replace(random_module(16, 40, 4, seed=1), kind="embedding")
    check_against_dense(emb, replace(random_module(16, 40, 2, seed=2), kind="embedding"))
    c1 = replace(random_module(12, 8, 4, seed=5), fan_in_fan_out=True)
    check_against_dense(c1, replace(random_module(12, 8, 4, seed=6), fan_in_fan_out=True))


def test_same_and_scaled_and_orthogonal() -> None:
    a = random_module(20, 16, 4, seed=0)
    same = diff_module("m", a, a)
    assert (same.change, same.cosine) == (0.0, pytest.approx(1.0)) and same.overlap == pytest.approx(1.0)
    doubled = diff_module("m", a, replace(a, scale=2 * a.scale))
    assert doubled.change == pytest.approx(1.0) and doubled.cosine == pytest.approx(1.0)
    # B in disjoint rows: column spaces orthogonal, ΔW orthogonal
    b1 = torch.zeros(20, 4)
    b1[:10] = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    b2 = torch.zeros(20, 4)
    b2[10:] = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    far = diff_module("m", replace(a, B=b1), replace(a, B=b2))
    assert far.overlap == pytest.approx(0.0, abs=1e-12) and far.cosine == pytest.approx(0.0, abs=1e-12)
    ratio = float(dense(replace(a, B=b2)).norm() / dense(replace(a, B=b1)).norm())
    assert far.change == pytest.approx(math.sqrt(1 + ratio**2), rel=1e-9)  # ‖x − y‖² = ‖x‖² + ‖y‖²


def test_bookkeeping_and_order() -> None:
    mods = {f"layers.{i}.q": random_module(16, 16, 4, seed=i) for i in range(3)}
    a = Adapter(modules={**mods, "layers.0.k": random_module(16, 16, 4, seed=9)})
    moved = replace(mods["layers.1.q"], B=mods["layers.1.q"].B * 3)
    b = Adapter(modules={**mods, "layers.1.q": moved, "layers.2.q": replace(mods["layers.2.q"], alpha=99.0),
                         "layers.0.v": random_module(16, 16, 2, seed=7)})  # fmt: skip
    result = diff(a, b)
    assert result.added == ("layers.0.v",) and result.removed == ("layers.0.k",)
    assert result.modules[0].module == "layers.1.q" and result.modules[0].change == pytest.approx(
        2.0, rel=1e-6
    )  # B·3 rounds in float32
    assert [m.module for m in result.modules if m.config_changed] == ["layers.2.q"]
    norms = [m.norm_a**2 for m in result.modules]
    assert result.change == pytest.approx(math.sqrt(4 * norms[0] / sum(norms)), rel=1e-6)
    assert not result.identical and diff(a, a).identical


def test_adapters_for_different_bases_are_refused(tmp_path: Path) -> None:
    a = Adapter(modules={"layers.0.q": random_module(16, 16, 4)})
    b = Adapter(modules={"layers.0.q": random_module(32, 16, 4)})
    with pytest.raises(ShapeMismatchError, match="different bases"):
        diff(a, b)
    with pytest.raises(UsageError, match="share no module"):
        diff(a, Adapter(modules={"layers.0.v": random_module(16, 16, 4)}))
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    code, out, err = run_cli("diff", tmp_path / "a", tmp_path / "b")
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 2
    assert lines[0].startswith("error: module 'layers.0.q'") and lines[1].startswith("hint: ")


def test_cli_text_fits_80_columns_and_json_matches_library(tmp_path: Path) -> None:
    qv, patterns = FIXTURES / "tiny-qv", FIXTURES / "tiny-patterns"
    code, out, err = run_cli("diff", qv, patterns)
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "4 common, 10 added, 0 removed" in out
    code, out, _ = run_cli("diff", qv, patterns, "--json")
    doc = json.loads(out)
    expected = diff(load_adapter(qv), load_adapter(patterns))
    assert doc["change"] == pytest.approx(expected.change) and len(doc["added"]) == 10
    assert [m["module"] for m in doc["modules"]] == [m.module for m in expected.modules]


def test_cli_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "diff.png"
    code, _, err = run_cli("diff", FIXTURES / "tiny-qv", FIXTURES / "tiny-patterns", "--plot", png)
    assert code == 0, err
    assert f"plot: {png}" in err.splitlines()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registry_versions(tmp_path: Path) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    assert run_cli("push", FIXTURES / "tiny-qv", repo, "--create", "--tag", "v1")[0] == 0
    assert run_cli("push", FIXTURES / "tiny-patterns", repo, "--tag", "v2")[0] == 0
    code, out, err = run_cli("diff", f"{repo}@v1", f"{repo}@v2", "--json")
    assert code == 0, err
    local = run_cli("diff", FIXTURES / "tiny-qv", FIXTURES / "tiny-patterns", "--json")[1]
    assert json.loads(out)["modules"] == json.loads(local)["modules"]
    code, _, err = run_cli("diff", f"{repo}@v9", f"{repo}@v2")
    assert code != 0 and err.startswith("error: ") and "hint: " in err


def test_diff_measures_what_resize_reports() -> None:
    # two features checked against each other: the change diff sees is the error resize --budget states
    from loractl.ops.resize import resize_to_budget

    adapter = load_adapter(FIXTURES / "tiny-qv")
    result = resize_to_budget(adapter, 2048)
    assert result.budget is not None
    assert diff(adapter, result.adapter).change == pytest.approx(result.budget.rel_error, rel=1e-5)
