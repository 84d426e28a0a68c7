"""combine: exact sums against a dense float64 reference, parity with PEFT's add_weighted_adapter, bad input, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import loractl
from loractl.adapter import Adapter, AdapterMeta
from loractl.cli import cli, main
from loractl.errors import AdapterError, ShapeMismatchError, UsageError
from loractl.ops.combine import CombineOptions, combine
from loractl.ops.lowrank import RankRule
from tests.helpers import random_module

NAMES = ("m.layers.0.q", "m.layers.0.v", "m.layers.1.q")


def _adapter(seed: int, ranks: list[int], present: list[bool], rslora: bool, out: int = 12, inp: int = 10) -> Adapter:
    modules = {}
    for i, (name, r, keep) in enumerate(zip(NAMES, ranks, present, strict=True)):
        if keep:
            m = random_module(out, inp, r, alpha=float(r + seed % 5 + 1), seed=100 * seed + i)
            if rslora:
                m = replace(m, scale=m.alpha / math.sqrt(r), scale_rule="alpha/sqrt(r)")  # type: ignore[operator]
            modules[name] = m
    return Adapter(modules=modules, meta=AdapterMeta(base_model="tiny", source_format="peft"))


adapters_st = st.lists(
    st.builds(
        _adapter,
        st.integers(0, 1000),
        st.lists(st.integers(1, 5), min_size=3, max_size=3),
        st.lists(st.booleans(), min_size=3, max_size=3),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
).filter(lambda ads: all(any(n in a.modules for a in ads) for n in NAMES[:1]))


def _reference(adapters: list[Adapter], weights: list[float], name: str) -> torch.Tensor:
    """Σ wᵢ sᵢ Bᵢ Aᵢ in float64, a missing module counting as zero."""
    total = torch.zeros(12, 10, dtype=torch.float64)
    for w, a in zip(weights, adapters, strict=True):
        if name in a.modules:
            m = a.modules[name]
            total += w * m.scale * (m.B.double() @ m.A.double())
    return total


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - y.double()) / torch.linalg.matrix_norm(y.double()))


@given(adapters_st, st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3))
def test_cat_and_full_rank_svd_equal_the_dense_weighted_sum(adapters: list[Adapter], ws: list[float]) -> None:
    weights = ws[: len(adapters)]
    cat = combine(adapters, CombineOptions(method="cat", weights=tuple(weights))).adapter
    full = combine(adapters, CombineOptions(method="svd", weights=tuple(weights), rule=RankRule(rank=99))).adapter
    for name, m in cat.modules.items():
        ref = _reference(adapters, weights, name)
        assert m.rank == sum(a.modules[name].rank for a in adapters if name in a.modules)
        assert _rel(m.delta_weight(), ref) < 1e-6
        assert _rel(full.modules[name].delta_weight(), ref) < 1e-6


@given(adapters_st, st.integers(1, 6))
def test_truncated_svd_equals_dense_svd_truncation(adapters: list[Adapter], rank: int) -> None:
    weights = [0.5 + i for i in range(len(adapters))]
    result = combine(adapters, CombineOptions(method="svd", weights=tuple(weights), rule=RankRule(rank=rank)))
    for rep in result.report:
        ref = _reference(adapters, weights, rep.module)
        u, s, vh = torch.linalg.svd(ref, full_matrices=False)
        k = rep.rank_out
        assert k == min(rank, rep.rank_in, 10)
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        optimal = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
        ours = result.adapter.modules[rep.module].delta_weight()
        assert rep.rel_error == pytest.approx(optimal, abs=1e-9)
        assert _rel(ours, ref) == pytest.approx(optimal, abs=1e-5)
        if k == len(s) or float(s[k - 1] - s[k]) > 1e-3 * float(s[0]):  # the truncation is unique
            assert _rel(ours, best) < 1e-5


def test_linear_is_peft_mix_and_reports_its_gap() -> None:
    a, b = _adapter(1, [4, 4, 4], [True] * 3, False), _adapter(2, [4, 4, 4], [True] * 3, True)
    result = combine([a, b], CombineOptions(method="linear", weights=(0.5, -1.0)))
    assert result.warnings and "not the weighted sum" in result.warnings[0]
    for rep in result.report:
        ma, mb = a.modules[rep.module], b.modules[rep.module]
        ra, rb = math.sqrt(0.5 * ma.scale), math.sqrt(1.0 * mb.scale)
        expected = (ra * ma.B + rb * mb.B) @ (ra * ma.A - rb * mb.A)
        assert torch.allclose(result.adapter.modules[rep.module].delta_weight(), expected, atol=1e-4)
        exact = _reference([a, b], [0.5, -1.0], rep.module)
        assert rep.rel_error == pytest.approx(_rel(expected, exact), rel=1e-4)


def test_lineage_records_op_params_parents_and_errors(tmp_path: Path) -> None:
    a, b = _adapter(1, [4, 3, 2], [True, True, False], False), _adapter(2, [2, 2, 2], [True] * 3, False)
    result = combine([a, b], CombineOptions(method="svd", weights=(1.0, 2.0), rule=RankRule(rank=2)))
    loractl.save_adapter(result.adapter, tmp_path / "out")
    back = loractl.load_adapter(tmp_path / "out")
    entry = back.lineage[-1]
    assert entry["op"] == "combine" and entry["parents"] == [a.content_hash(), b.content_hash()]
    assert entry["params"] == {"method": "svd", "weights": [1.0, 2.0], "rank": 2}
    assert entry["metrics"]["max_rel_error"] == max(r.rel_error for r in result.report) > 0
    assert torch.equal(back.modules[NAMES[2]].delta_weight(), result.adapter.modules[NAMES[2]].delta_weight())


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly() -> None:
    a = _adapter(1, [4, 4, 4], [True] * 3, False)
    wide = Adapter(modules={NAMES[0]: random_module(12, 11, 4)}, meta=AdapterMeta(base_model="tiny"))
    with pytest.raises(ShapeMismatchError, match="shapes differ"):
        combine([a, wide], CombineOptions(method="cat"))
    other = replace(a, meta=AdapterMeta(base_model="other"))
    with pytest.raises(AdapterError, match="different bases"):
        combine([a, other], CombineOptions(method="cat"))
    assert combine([a, other], CombineOptions(method="cat", allow_base_mismatch=True)).adapter.modules
    with pytest.raises(UsageError, match="2 weights for 1 adapters"):
        combine([a], CombineOptions(weights=(1.0, 2.0)))
    with pytest.raises(UsageError, match="at least 1"):
        combine([a], CombineOptions(rule=RankRule(rank=0)))
    with pytest.raises(UsageError, match="density"):
        combine([a, a], CombineOptions(method="ties"))
    with pytest.raises(AdapterError, match="equal ranks"):
        combine([a, _adapter(2, [2, 4, 4], [True] * 3, False)], CombineOptions(method="linear"))
    dora = replace(a, modules={n: replace(m, magnitude=torch.ones(12)) for n, m in a.modules.items()})
    with pytest.raises(AdapterError, match=r"DoRA.*not"):
        combine([a, dora], CombineOptions(method="svd"))


def test_cli_errors_render_with_exit_codes(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qv, dora = (str(fixtures_dir / "adapters" / n) for n in ("tiny-qv", "tiny-dora"))
    for args, code, text in [
        (["combine", qv, qv, "-o", str(tmp_path / "x"), "--weight", "1"], 2, "1 weights for 2 adapters"),
        (["combine", qv, dora, "-o", str(tmp_path / "x")], 1, "DoRA"),
        (["combine", qv, qv, "-o", str(tmp_path / "x"), "--rank", "0"], 2, "rank must be at least 1"),
        (["combine", qv, qv, "-o", qv], 2, "would overwrite the input"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == code and text in err and "hint:" in err


def test_cli_combine_writes_peft_with_report(fixtures_dir: Path, tmp_path: Path) -> None:
    qv, pat = (str(fixtures_dir / "adapters" / n) for n in ("tiny-qv", "tiny-patterns"))
    out = tmp_path / "mix"
    run = CliRunner().invoke(cli, ["combine", qv, pat, "-o", str(out), "--method", "svd", "--energy", "0.9", "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    assert doc["format"] == "peft" and len(doc["modules"]) == 14  # the union of both adapters' modules
    assert all(r["rel_error"] <= math.sqrt(0.1) + 1e-9 for r in doc["modules"])
    back = loractl.load_adapter(out)
    assert back.content_hash() == doc["content_hash"] and back.meta.source_format == "peft"
    assert (out / "adapter_config.json").is_file()


# --- parity with PEFT's add_weighted_adapter ------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_mixes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """PEFT's own add_weighted_adapter on the tiny Llama, and the adapters it combined."""
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    base_dir, qv2 = fixtures / "tiny-llama", tmp_path_factory.mktemp("peft") / "qv2"
    torch.manual_seed(7)
    config = LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).save_pretrained(qv2)
    paths = {"qv": fixtures / "adapters" / "tiny-qv", "qv2": qv2, "pat": fixtures / "adapters" / "tiny-patterns"}
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), paths["qv"], adapter_name="qv")
    for name in ("qv2", "pat"):
        model.load_adapter(paths[name], adapter_name=name)
    freeze = peft.tuners.lora.model._freeze_adapter

    def freeze_then_seed(*args: Any) -> None:  # PEFT's layer init draws from the global RNG before its drops
        freeze(*args)
        torch.manual_seed(123)

    peft.tuners.lora.model._freeze_adapter = freeze_then_seed
    try:
        for mix, names, weights, kw in MIXES:
            model.add_weighted_adapter(list(names), list(weights), mix, **kw)
    finally:
        peft.tuners.lora.model._freeze_adapter = freeze
    return {"model": model, "adapters": {n: loractl.load_adapter(p) for n, p in paths.items()}}


MIXES = [
    ("linear", ("qv", "qv2"), (0.7, -0.4), {"combination_type": "linear"}),
    ("cat", ("qv", "pat"), (0.6, 1.3), {"combination_type": "cat"}),
    ("svd", ("qv", "pat"), (0.6, 1.3), {"combination_type": "svd", "svd_rank": 6}),
    ("ties", ("qv", "qv2"), (0.7, 0.5), {"combination_type": "ties_svd", "svd_rank": 8, "density": 0.5}),
    ("dare", ("qv", "qv2"), (0.7, 0.5), {"combination_type": "dare_linear_svd", "svd_rank": 8, "density": 0.6}),
    ("dare_ties", ("qv", "qv2"), (1.0, 0.8), {"combination_type": "dare_ties_svd", "svd_rank": 8, "density": 0.6}),
]


@pytest.mark.parametrize(("mix", "names", "weights", "kw"), MIXES, ids=[m[0] for m in MIXES])
def test_matches_peft_add_weighted_adapter(
    peft_mixes: dict[str, Any], mix: str, names: tuple[str, ...], weights: tuple[float, ...], kw: dict[str, Any]
) -> None:
    inputs = [peft_mixes["adapters"][n] for n in names]
    rule = RankRule(rank=kw["svd_rank"]) if "svd_rank" in kw else None
    options = CombineOptions(method=mix, weights=weights, rule=rule, density=kw.get("density"), seed=123)
    ours = combine(inputs, options).adapter
    model = peft_mixes["model"].base_model.model
    assert set(ours.modules) == {n for a in inputs for n in a.modules}
    for name, m in ours.modules.items():
        theirs = model.get_submodule(name).get_delta_weight(mix)
        assert _rel(m.delta_weight(), theirs) < (1e-4 if rule else 1e-6), name
