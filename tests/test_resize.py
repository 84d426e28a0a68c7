"""resize: optimal truncation against a dense float64 SVD, dynamic rules, DoRA, lineage, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import loractl
from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.cli import cli, main
from loractl.ops.lowrank import RankRule
from loractl.ops.resize import resize
from tests.helpers import random_module


def _decaying(out: int, inp: int, rank: int, seed: int, **kw: object) -> LoraModule:
    """A module whose ΔW has a decaying spectrum (as trained adapters do), so truncations are unique."""
    m = random_module(out, inp, rank, seed=seed, **kw)
    return replace(m, B=m.B * torch.logspace(0, -1.5, rank))


modules_st = st.builds(_decaying, st.integers(2, 20), st.integers(2, 20), st.integers(1, 8), st.integers(0, 999))


def _dense(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.B.double().flatten(1) @ m.A.double().flatten(1))


@given(modules_st)
def test_resize_to_own_rank_keeps_delta(m: LoraModule) -> None:
    adapter = Adapter(modules={"x": m})
    out = resize(adapter, RankRule(rank=m.rank)).adapter.modules["x"]
    if m.rank <= min(m.out_features, m.in_features):
        assert torch.equal(out.delta_weight(), m.delta_weight())  # nothing to drop: kept bit for bit
    else:  # rank above min(out, in): re-factored losslessly at min(out, in)
        assert out.rank == min(m.out_features, m.in_features)
        dense = _dense(m)
        assert float(torch.linalg.matrix_norm(_dense(out) - dense) / torch.linalg.matrix_norm(dense)) < 1e-6


@given(modules_st, st.integers(1, 8))
def test_resize_equals_dense_optimal_truncation(m: LoraModule, rank: int) -> None:
    result = resize(Adapter(modules={"x": m}), RankRule(rank=rank))
    out, rep = result.adapter.modules["x"], result.report[0]
    dense = _dense(m)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, m.rank, *dense.shape)
    assert rep.rank_out == out.rank == k and out.scale == m.scale
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    norm = float(torch.linalg.matrix_norm(dense))
    assert float(torch.linalg.matrix_norm(_dense(out) - best)) / norm < 1e-5
    optimal = math.sqrt(float((s[k:] ** 2).sum())) / norm
    assert rep.rel_error == pytest.approx(optimal, abs=1e-9)


def test_conv_and_rslora_modules_keep_their_layout() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, 3, 3, generator=g), torch.randn(8, 6, 1, 1, generator=g)
    conv = LoraModule(A=a, B=b, scale=0.5, alpha=3.0, kind="conv")
    rs = replace(random_module(16, 12, 9, alpha=6.0), scale=2.0, scale_rule="alpha/sqrt(r)")
    result = resize(Adapter(modules={"c": conv, "r": rs}), RankRule(rank=3))
    c, r = result.adapter.modules["c"], result.adapter.modules["r"]
    assert c.A.shape == (3, 4, 3, 3) and c.B.shape == (8, 3, 1, 1) and c.alpha == pytest.approx(1.5)
    assert r.scale == 2.0 and r.alpha == pytest.approx(2.0 * math.sqrt(3))
    dense = _dense(conv)
    s = torch.linalg.svdvals(dense)
    optimal = math.sqrt(float((s[3:] ** 2).sum() / (s**2).sum()))
    achieved = float(torch.linalg.matrix_norm(dense - _dense(c)) / torch.linalg.matrix_norm(dense))
    assert achieved == pytest.approx(optimal, rel=1e-5)


def test_dynamic_rules_choose_per_module_ranks() -> None:
    modules = {f"m{i}": _decaying(24, 20, 8, seed=i) for i in range(3)}
    modules["flat"] = random_module(24, 20, 8, seed=9)
    adapter = Adapter(modules=modules)
    result = resize(adapter, RankRule(energy=0.95, max_rank=6))
    for rep in result.report:
        s = torch.linalg.svdvals(_dense(adapter.modules[rep.module]))
        cum = torch.cumsum(s**2, 0) / (s**2).sum()
        expected = min(int((cum < 0.95 * (1 - 1e-12)).sum()) + 1, 6)
        assert rep.rank_out == min(expected, 8)
        assert rep.rank_out == 6 or rep.rel_error <= math.sqrt(0.05) + 1e-9
    assert len({r.rank_out for r in result.report}) > 1


def test_dora_keeps_magnitude_and_warns() -> None:
    m = replace(_decaying(12, 10, 4, seed=1), magnitude=torch.rand(12, generator=torch.Generator().manual_seed(2)))
    result = resize(Adapter(modules={"x": m}), RankRule(rank=2))
    assert torch.equal(result.adapter.modules["x"].magnitude, m.magnitude)  # type: ignore[arg-type]
    assert result.warnings and "DoRA" in result.warnings[0]


def test_lineage_names_parent_rule_and_errors() -> None:
    adapter = Adapter(modules={"x": _decaying(12, 10, 4, seed=1)}, meta=AdapterMeta(base_model="b"))
    adapter = adapter.with_lineage({"op": "train"})
    result = resize(adapter, RankRule(ratio=3.0, max_rank=3))
    assert result.adapter.lineage[0] == {"op": "train"}
    entry = result.adapter.lineage[-1]
    assert entry["op"] == "resize" and entry["parents"] == [adapter.content_hash()]
    assert entry["params"] == {"ratio": 3.0, "max_rank": 3}
    assert entry["metrics"]["modules"]["x"]["rank"] == result.report[0].rank_out


def test_cli_resize_fixture_with_report(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "adapters" / "tiny-patterns"
    run = CliRunner().invoke(cli, ["resize", str(src), "-o", str(tmp_path / "r"), "--rank", "1", "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    assert doc["format"] == "peft" and {r["rank_out"] for r in doc["modules"]} == {1}
    assert all(0 < r["rel_error"] < 1 for r in doc["modules"])
    before, after = loractl.load_adapter(src), loractl.load_adapter(tmp_path / "r")
    assert after.lineage[-1]["parents"] == [before.content_hash()]
    for name, m in after.modules.items():  # the kept rank-1 part is the leading singular direction of ΔW
        s = torch.linalg.svdvals(before.modules[name].delta_weight().double())
        assert float(torch.linalg.matrix_norm(m.delta_weight().double())) == pytest.approx(float(s[0]), rel=1e-5)
    text = CliRunner().invoke(cli, ["resize", str(src), "-o", str(tmp_path / "t"), "--fro", "0.9"])
    assert text.exit_code == 0 and "wrote" in text.output and "rel. error" in text.output


def test_cli_resize_bad_input(fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(fixtures_dir / "adapters" / "tiny-qv")
    (tmp_path / "exists").mkdir()
    for args, text in [
        (["resize", src, "-o", str(tmp_path / "x"), "--rank", "0"], "at least 1"),
        (["resize", src, "-o", str(tmp_path / "x")], "exactly one"),
        (["resize", src, "-o", str(tmp_path / "x"), "--rank", "2", "--energy", "0.5"], "exactly one"),
        (["resize", src, "-o", str(tmp_path / "exists"), "--rank", "2"], "already exists"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and text in err and "hint:" in err
