"""--budget: the ranks of all modules chosen together, checked against a brute-force optimum
over every rank combination (from dense spectra) and against the uniform-rank choice."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loractl.adapter import Adapter, LoraModule
from loractl.errors import UsageError
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.budget import allocate, parse_budget
from loractl.ops.extract import ExtractConfig, extract
from loractl.ops.resize import resize_to_budget
from tests.helpers import run_cli, tiny_base

SHAPES = {"l.0.q": (16, 16), "l.0.v": (8, 16), "l.0.up": (24, 16), "l.1.down": (24, 8)}


def brute_force(spectra: dict[str, list[float]], costs: dict[str, int], budget: int) -> float:
    """The largest Σ of kept σ² over every rank combination (1..len) within the budget."""
    names = list(spectra)
    best = -1.0
    for ranks in itertools.product(*(range(1, len(spectra[n]) + 1) for n in names)):
        if sum(k * costs[n] for k, n in zip(ranks, names, strict=True)) <= budget:
            best = max(best, sum(math.fsum(spectra[n][:k]) for k, n in zip(ranks, names, strict=True)))
    return best


spectrum_st = st.lists(st.floats(0.0, 100.0), min_size=1, max_size=5).map(lambda s: sorted(s, reverse=True))


@given(
    st.lists(st.tuples(spectrum_st, st.sampled_from([3, 4, 7, 10, 12])), min_size=1, max_size=4),
    st.integers(0, 60),
)
def test_allocation_is_the_brute_force_optimum(modules: list[tuple[list[float], int]], spare: int) -> None:
    spectra = {f"m{i}": s for i, (s, _) in enumerate(modules)}
    costs = {f"m{i}": c for i, (_, c) in enumerate(modules)}
    totals = {n: math.fsum(s) + 1.0 for n, s in spectra.items()}
    budget = sum(costs.values()) + spare
    chosen = allocate(spectra, totals, costs, budget)
    assert chosen.params <= budget
    assert chosen.params == sum(k * costs[n] for n, k in chosen.ranks.items())
    kept = sum(math.fsum(spectra[n][:k]) for n, k in chosen.ranks.items())
    assert kept == pytest.approx(brute_force(spectra, costs, budget), rel=1e-12, abs=1e-9)
    assert chosen.error_sq <= chosen.uniform_error_sq + 1e-9


def test_greedy_trap_a_cheap_module_does_not_crowd_out_a_valuable_one() -> None:
    # greedy by σ²/cost takes cheap's two steps (ratio 5) first and then cannot afford big's second rank (ratio 4)
    spectra = {"big": [100.0, 40.0], "cheap": [6.0, 5.0, 5.0]}
    costs = {"big": 10, "cheap": 1}
    chosen = allocate(spectra, {"big": 140.0, "cheap": 16.0}, costs, budget=21)
    assert chosen.ranks == {"big": 2, "cheap": 1}
    assert chosen.error_sq == pytest.approx(10.0)


def test_budget_below_rank_one_everywhere_is_refused() -> None:
    with pytest.raises(UsageError, match="below 32"):
        allocate({"a": [1.0], "b": [1.0]}, {"a": 1.0, "b": 1.0}, {"a": 16, "b": 16}, budget=31)


def test_parse_budget() -> None:
    assert parse_budget("1000", 4) == 1000
    assert parse_budget("4KB", 4) == 1000
    assert parse_budget("1KiB", 2) == 512
    with pytest.raises(UsageError):
        parse_budget("lots", 4)


def _adapter(seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (name, (out, inp)) in enumerate(SHAPES.items()):
        r = min(out, inp, 6)
        decay = torch.logspace(0, -0.2 - 1.5 * (i % 2), r) * (1 + i)  # slow and fast decays, different sizes
        modules[name] = LoraModule(A=torch.randn(r, inp, generator=g), B=torch.randn(out, r, generator=g) * decay,
                                   scale=0.5, alpha=3.0)  # fmt: skip
    return Adapter(modules=modules)


def _dense(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.B.double() @ m.A.double())


@pytest.mark.parametrize("uniform", [1, 2, 4])
def test_resize_to_budget_equals_the_optimum_from_dense_spectra(uniform: int) -> None:
    adapter = _adapter()
    costs = {n: sum(s) for n, s in SHAPES.items()}
    budget = uniform * sum(costs.values())  # exactly what the uniform rank costs: equal parameters
    result = resize_to_budget(adapter, budget)
    spectra = {n: (torch.linalg.svdvals(_dense(m)) ** 2).tolist()[: m.rank] for n, m in adapter.modules.items()}
    total = sum(float(_dense(m).square().sum()) for m in adapter.modules.values())
    dense_error = sum(float((_dense(result.adapter.modules[n]) - _dense(m)).square().sum())
                      for n, m in adapter.modules.items())  # fmt: skip
    uniform_error = sum(math.fsum(s[uniform:]) for s in spectra.values())
    assert result.budget is not None
    assert sum(m.rank * costs[n] for n, m in result.adapter.modules.items()) <= budget
    assert dense_error == pytest.approx(total - brute_force(spectra, costs, budget), rel=1e-6)
    assert dense_error == pytest.approx(result.budget.error_sq, rel=1e-6)
    assert result.budget.uniform_rank == uniform
    assert result.budget.uniform_error_sq == pytest.approx(uniform_error, rel=1e-6)
    assert dense_error <= uniform_error * (1 + 1e-9)
    ranks = {r.module: r.rank_out for r in result.report}
    assert len(set(ranks.values())) > 1 or uniform == 1  # the budget really moved ranks between modules


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """Checkpoints whose ΔW are full-rank with spectra decaying at different speeds per module."""
    base = tiny_base(tmp_path / "base", {f"{n}.weight": s for n, s in SHAPES.items()})
    g = torch.Generator().manual_seed(7)
    with Checkpoint(base) as ckpt:
        tensors = {name: ckpt.get(name) for name in ckpt.names}
    for i, (name, (out, inp)) in enumerate(SHAPES.items()):
        u, _ = torch.linalg.qr(torch.randn(out, min(out, inp), generator=g))
        v, _ = torch.linalg.qr(torch.randn(inp, min(out, inp), generator=g))
        s = 0.1 * torch.logspace(0, -(1 + i), min(out, inp))
        tensors[f"{name}.weight"] = tensors[f"{name}.weight"] + u @ torch.diag(s) @ v.T
    (tmp_path / "ft").mkdir()
    save_tensors(tmp_path / "ft" / "model.safetensors", tensors)
    return base, tmp_path / "ft"


def test_extract_budget_is_optimal_and_never_worse_than_uniform(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    costs = {n: sum(s) for n, s in SHAPES.items()}
    budget = 3 * sum(costs.values())
    report = extract(base, ft, tmp_path / "budget", ExtractConfig(budget=budget, max_rank=8))
    uniform = extract(base, ft, tmp_path / "uniform", ExtractConfig(rank=3))
    with Checkpoint(base) as b, Checkpoint(ft) as f:
        deltas = {n: (f.get(f"{n}.weight") - b.get(f"{n}.weight")).double() for n in SHAPES}
    spectra = {n: (torch.linalg.svdvals(d) ** 2).tolist() for n, d in deltas.items()}
    total = sum(float(d.square().sum()) for d in deltas.values())
    best = total - brute_force(spectra, costs, budget)
    error = sum(m.residual_sq for m in report.modules)
    assert sum(m.rank * costs[m.module] for m in report.modules) <= budget
    assert error == pytest.approx(best, rel=1e-4)
    assert error < sum(m.residual_sq for m in uniform.modules)
    assert report.budget is not None and report.budget.uniform_error_sq == pytest.approx(
        sum(m.residual_sq for m in uniform.modules), rel=1e-4
    )
    from loractl.formats import load_adapter

    written = load_adapter(tmp_path / "budget")
    for n, d in deltas.items():  # the written factors hold the reported error
        assert float((written.modules[n].delta_weight().double() - d).square().sum()) == pytest.approx(
            next(m.residual_sq for m in report.modules if m.module == n), rel=1e-3, abs=1e-12
        )


def test_cli_resize_budget_json_and_refusals(tmp_path: Path) -> None:
    from loractl.formats import save_adapter

    save_adapter(_adapter(), tmp_path / "a")
    code, out, err = run_cli("resize", tmp_path / "a", "-o", tmp_path / "b", "--budget", "1KB", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["budget"]["params"] <= 250 and doc["budget"]["rel_error"] <= doc["budget"]["uniform"]["rel_error"]
    code, _, err = run_cli("resize", tmp_path / "a", "-o", tmp_path / "c", "--budget", "100")
    assert code == 2 and "error: --budget 100 parameters is below 128" in err and "hint:" in err
    assert not (tmp_path / "c").exists()
    code, _, err = run_cli("resize", tmp_path / "a", "-o", tmp_path / "c", "--budget", "1000", "--rank", "2")
    assert code == 2 and "--budget" in err


def test_cli_extract_budget_text_report(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    code, out, err = run_cli("extract", base, ft, "-o", tmp_path / "out", "--budget", "2KB")
    assert code == 0, err
    assert "budget 500 params" in out and "uniform rank" in out


@pytest.mark.slow
def test_extract_budget_on_the_real_smollm2(smollm2: Path, tmp_path: Path) -> None:
    """The real 135M model + a q/v LoRA whose layers differ in strength: --budget beats the uniform rank
    at the same size, and `diff` against the true adapter measures the error the report states."""
    from loractl.formats import load_adapter
    from loractl.ops.diff import diff
    from loractl.ops.merge import merge

    g = torch.Generator().manual_seed(11)
    modules = {}
    for layer in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            decay = torch.logspace(0, -1 - (layer % 3), 8) * 0.02 * (1 + layer % 5)
            modules[f"model.layers.{layer}.self_attn.{proj}"] = LoraModule(
                A=torch.randn(8, 576, generator=g), B=torch.randn(out, 8, generator=g) * decay, scale=1.0, alpha=8.0
            )
    from loractl.formats import save_adapter

    save_adapter(Adapter(modules=modules), tmp_path / "true")
    merge(smollm2, [tmp_path / "true"], tmp_path / "ft")
    targets = ("q_proj", "v_proj")
    budget = 3 * 30 * (576 + 576 + 192 + 576)  # what uniform rank 3 costs
    report = extract(smollm2, tmp_path / "ft", tmp_path / "budget", ExtractConfig(budget=budget, targets=targets))
    uniform = extract(smollm2, tmp_path / "ft", tmp_path / "uniform", ExtractConfig(rank=3, targets=targets))
    assert report.budget is not None and report.budget.params <= budget
    assert report.totals()["rel_error"] < 0.9 * uniform.totals()["rel_error"]
    measured = diff(load_adapter(tmp_path / "true"), load_adapter(tmp_path / "budget")).change
    assert measured == pytest.approx(report.totals()["rel_error"], rel=1e-3)
