"""extract: plan, exactness, rank rules, reporting, lineage, bad input and the CLI (PEFT parity in test_extract_peft)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loractl
from loractl.cli import cli
from loractl.errors import NumericError, OutputExistsError, ShapeMismatchError, UsageError
from loractl.io.checkpoint import Checkpoint, touched_weight_names
from loractl.io.checkpoint_writer import write_sharded
from loractl.io.safetensors_writer import TensorSpec, save_tensors
from loractl.ops.extract import ExtractConfig, ReadAhead, dry_run, extract, extract_adapter
from tests.helpers import random_module, tiny_base

Q, V, UP, CONV = "layers.0.q_proj", "layers.0.v_proj", "layers.0.up_proj", "layers.0.conv"
SHAPES = {
    "embed_tokens.weight": (40, 16),
    f"{Q}.weight": (16, 16),
    f"{V}.weight": (8, 16),
    f"{UP}.weight": (24, 16),
    f"{CONV}.weight": (6, 4, 3, 3),
    "layers.0.norm.weight": (16,),
    "norm.weight": (16,),
    "lm_head.weight": (40, 16),
}
TRUE_RANKS = {Q: 4, V: 2, UP: 3}


def deltas(ranks: dict[str, int] = TRUE_RANKS) -> dict[str, torch.Tensor]:
    """ΔW per module from random adapters of known rank (the independent reference)."""
    out = {}
    for i, (module, r) in enumerate(ranks.items()):
        shape = SHAPES[f"{module}.weight"]
        out[module] = random_module(shape[0], shape[1], r, seed=i, alpha=float(r)).delta_weight() * 0.05
    return out


def make_pair(
    tmp_path: Path, edit: dict[str, torch.Tensor] | None = None, shapes: dict[str, tuple[int, ...]] = SHAPES
) -> tuple[Path, Path]:
    """A base checkpoint and a fine-tuned one = base + ΔW per module (+ a changed final norm)."""
    base = tiny_base(tmp_path / "base", shapes)
    with Checkpoint(base) as ckpt:
        tensors = {name: ckpt.get(name) for name in ckpt.names}
    for module, d in deltas().items():
        tensors[f"{module}.weight"] = tensors[f"{module}.weight"] + d
    tensors["norm.weight"] = tensors["norm.weight"] + 0.5
    tensors.update(edit or {})
    (tmp_path / "ft").mkdir()
    save_tensors(tmp_path / "ft" / "model.safetensors", tensors)
    return base, tmp_path / "ft"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("rank", [4, 6])
def test_rank_at_least_true_rank_reproduces_every_delta(tmp_path: Path, rank: int) -> None:
    base, ft = make_pair(tmp_path)
    result = extract_adapter(base, ft, ExtractConfig(rank=rank))
    for module, d in deltas().items():
        m = result.adapter.modules[module]
        assert m.rank == rank and m.scale == 1.0 and m.alpha == rank
        assert rel(m.delta_weight(), d) <= 1e-5
    errors = {r.module: r.rel_error for r in result.report.modules}
    assert set(errors) == set(TRUE_RANKS) and max(errors.values()) <= 1e-5
    assert all(r.energy == pytest.approx(1.0, abs=1e-6) for r in result.report.modules)


def test_report_lists_what_is_not_extracted(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    report = extract_adapter(base, ft, ExtractConfig(rank=4)).report
    status = {n.name: (n.status, n.reason) for n in report.notes}
    assert status["norm.weight"] == ("not-extracted", "1-D tensor (norm or bias)")
    assert status["layers.0.norm.weight"][0] == "identical"
    assert status["embed_tokens.weight"][0] == "identical" and status["lm_head.weight"][0] == "identical"
    assert status[f"{CONV}.weight"] == ("identical", "ΔW = 0")
    totals = report.totals()
    assert totals["modules"] == 3 and totals["not_extracted"] == 1 and totals["identical"] == 4
    q = next(r for r in report.modules if r.module == Q)
    w0 = Checkpoint(base).get(f"{Q}.weight")
    assert q.delta_ratio == pytest.approx(rel(w0 + deltas()[Q], w0), rel=1e-6)


def test_truncation_error_and_energy_match_the_spectrum(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    result = extract_adapter(base, ft, ExtractConfig(rank=2, targets=(Q,)))
    s = torch.linalg.svdvals(deltas()[Q].double())
    (report,) = result.report.modules
    assert report.rel_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
    assert report.energy == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-5)
    assert {n.name: n.reason for n in result.report.notes}[f"{V}.weight"] == "not matched by --targets"


def test_energy_chooses_rank_per_module_and_writes_rank_pattern(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    out = tmp_path / "out"
    report = extract(base, ft, out, ExtractConfig(energy=1.0))
    assert {r.module: r.rank for r in report.modules} == TRUE_RANKS
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] in TRUE_RANKS.values() and len(config["rank_pattern"]) == 2
    loaded = loractl.load_adapter(out)
    for module, d in deltas().items():
        assert loaded.modules[module].rank == TRUE_RANKS[module] and loaded.modules[module].scale == 1.0
        assert rel(loaded.modules[module].delta_weight(), d) <= 1e-5
    capped = extract_adapter(base, ft, ExtractConfig(energy=1.0, max_rank=2)).report
    assert {r.module: r.rank for r in capped.modules} == {Q: 2, V: 2, UP: 2}


def test_alpha_sets_scale_and_keeps_delta(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    m = extract_adapter(base, ft, ExtractConfig(rank=4, alpha=16.0)).adapter.modules[Q]
    assert m.scale == 4.0 and m.alpha == 16.0
    assert rel(m.delta_weight(), deltas()[Q]) <= 1e-5
    assert float(m.B.norm(dim=0).max() / m.A.norm(dim=1).max()) == pytest.approx(1.0, rel=0.2)  # balanced


def test_bfloat16_factors_report_the_cast_error(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    result = extract_adapter(base, ft, ExtractConfig(rank=4, dtype="bf16"))
    m = result.adapter.modules[Q]
    assert m.A.dtype == torch.bfloat16 and m.B.dtype == torch.bfloat16
    (q,) = [r for r in result.report.modules if r.module == Q]
    assert q.rel_error == pytest.approx(rel(m.delta_weight(), deltas()[Q]), rel=1e-3)
    assert 1e-4 < q.rel_error < 2e-2


def test_save_full_keeps_tensors_whole(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    result = extract_adapter(base, ft, ExtractConfig(rank=4, save_full=("norm",)))  # a suffix: both norms
    assert list(result.adapter.full_tensors) == ["layers.0.norm.weight", "norm.weight"]
    torch.testing.assert_close(result.adapter.full_tensors["norm.weight"], Checkpoint(ft).get("norm.weight"))
    assert result.report.totals()["not_extracted"] == 0 and result.report.totals()["saved_full"] == 2
    extract(base, ft, tmp_path / "out", ExtractConfig(rank=4, save_full=(r"(?<!\.)norm",)))  # the top-level one only
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["norm"]
    torch.testing.assert_close(
        loractl.load_adapter(tmp_path / "out").full_tensors["norm.weight"], Checkpoint(ft).get("norm.weight")
    )


def test_targeted_embedding_conv_and_head(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    w = tiny_base(tmp_path / "probe", SHAPES)
    with Checkpoint(w) as ckpt:
        emb, conv, head = (ckpt.get(n) for n in ("embed_tokens.weight", f"{CONV}.weight", "lm_head.weight"))
    d_emb = torch.randn(40, 2, generator=g) @ torch.randn(2, 16, generator=g)
    d_conv = (torch.randn(6, 2, generator=g) @ torch.randn(2, 36, generator=g)).reshape(6, 4, 3, 3)
    d_head = torch.randn(40, 3, generator=g) @ torch.randn(3, 16, generator=g)
    edit = {"embed_tokens.weight": emb + d_emb, f"{CONV}.weight": conv + d_conv, "lm_head.weight": head + d_head}
    base, ft = make_pair(tmp_path, edit)
    adapter = extract_adapter(base, ft, ExtractConfig(rank=3, targets=("embed_tokens", "conv", "lm_head"))).adapter
    assert {n: m.kind for n, m in adapter.modules.items()} == {
        "embed_tokens": "embedding",
        CONV: "conv",
        "lm_head": "linear",
    }
    assert adapter.modules["embed_tokens"].A.shape == (3, 40) and adapter.modules[CONV].B.shape == (6, 3, 1, 1)
    for name, d in (("embed_tokens", d_emb), (CONV, d_conv), ("lm_head", d_head)):
        assert rel(adapter.modules[name].delta_weight(), d) <= 1e-5
    extract(base, ft, tmp_path / "out", ExtractConfig(rank=3, targets=("embed_tokens", "conv", "lm_head")))
    loaded = loractl.load_adapter(tmp_path / "out")
    assert rel(loaded.modules["embed_tokens"].delta_weight(), d_emb) <= 1e-5


def test_sharded_and_bf16_checkpoints(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    with Checkpoint(ft) as ckpt:
        tensors = {n: ckpt.get(n).to(torch.bfloat16) if ckpt.get(n).ndim == 2 else ckpt.get(n) for n in ckpt.names}
    specs = [TensorSpec(n, "BF16" if t.dtype == torch.bfloat16 else "F32", tuple(t.shape)) for n, t in tensors.items()]
    write_sharded(tmp_path / "sharded", specs, tensors.__getitem__, max_shard_bytes=1500)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    result = extract_adapter(base, tmp_path / "sharded", ExtractConfig(rank=4))
    exact = tensors[f"{Q}.weight"].float() - Checkpoint(base).get(f"{Q}.weight")  # bf16 rounding: full rank now
    s = torch.linalg.svdvals(exact.double())
    (q,) = [r for r in result.report.modules if r.module == Q]
    assert q.rel_error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-4)  # Eckart–Young optimum
    assert rel(result.adapter.modules[Q].delta_weight(), exact) == pytest.approx(q.rel_error, rel=1e-4)
    assert any("base is F32, fine-tuned is BF16" in w for w in result.report.warnings)


def test_lineage_records_params_report_and_fingerprints(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    extract(base, ft, tmp_path / "out", ExtractConfig(rank=4, targets=("q_proj", "v_proj")))
    adapter = loractl.load_adapter(tmp_path / "out")
    (entry,) = adapter.lineage
    assert (
        entry["op"] == "extract" and entry["params"]["rank"] == 4 and entry["params"]["targets"] == ["q_proj", "v_proj"]
    )
    with Checkpoint(base) as b, Checkpoint(ft) as f:
        assert entry["params"]["base"]["fingerprint"] == b.fingerprint(b.names)
        assert entry["params"]["finetuned"]["fingerprint"] == f.fingerprint(f.names)
        assert adapter.meta.base_fingerprint == b.fingerprint(touched_weight_names(adapter.modules, b))
    assert entry["metrics"]["totals"]["modules"] == 2
    assert {m["module"] for m in entry["metrics"]["modules"]} == {Q, V}
    assert {"name": "norm.weight", "reason": "1-D tensor (norm or bias)"} in entry["metrics"]["not_extracted"]


def test_resized_vocabulary_is_listed(tmp_path: Path) -> None:
    shapes = dict(SHAPES)
    base = tiny_base(tmp_path / "base", shapes)
    with Checkpoint(base) as ckpt:
        tensors = {n: ckpt.get(n) for n in ckpt.names}
    tensors["embed_tokens.weight"] = torch.cat([tensors["embed_tokens.weight"], torch.zeros(2, 16)])
    tensors[f"{Q}.weight"] = tensors[f"{Q}.weight"] + deltas()[Q]
    save_tensors(tmp_path / "ft.safetensors", tensors)
    report = extract_adapter(base, tmp_path / "ft.safetensors", ExtractConfig(rank=4)).report
    reason = {n.name: n.reason for n in report.not_extracted()}["embed_tokens.weight"]
    assert reason == "resized vocabulary (40 → 42 rows)"
    with pytest.raises(UsageError, match="resized"):
        extract_adapter(base, tmp_path / "ft.safetensors", ExtractConfig(rank=4, save_full=("embed_tokens",)))


def bad_pair(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """A base and a fine-tuned checkpoint that cannot be paired (or hold NaN)."""
    if case == "shape":
        return make_pair(tmp_path, {f"{V}.weight": torch.zeros(8, 17)})
    if case == "nan":
        return make_pair(tmp_path, {f"{UP}.weight": torch.full((24, 16), float("nan"))})
    if case == "nan-norm":
        return make_pair(tmp_path, {"layers.0.norm.weight": torch.full((16,), float("inf"))})
    base, ft = make_pair(tmp_path)
    with Checkpoint(ft) as ckpt:
        tensors = {n: ckpt.get(n) for n in ckpt.names if n != "lm_head.weight"}
    save_tensors(tmp_path / "missing.safetensors", tensors)
    return base, tmp_path / "missing.safetensors"


@pytest.mark.parametrize(
    ("case", "config", "error", "text"),
    [
        ("shape", ExtractConfig(rank=4), ShapeMismatchError, "is [8, 16] in the base but [8, 17]"),
        ("missing", ExtractConfig(rank=4), ShapeMismatchError, "'lm_head.weight' is in the base checkpoint but not"),
        ("nan", ExtractConfig(rank=4), NumericError, "NaN or Inf in the fine-tuned checkpoint"),
        ("nan-norm", ExtractConfig(rank=4), NumericError, "'layers.0.norm.weight' holds NaN or Inf"),
        ("ok", ExtractConfig(rank=0), UsageError, "at least 1"),
        ("ok", ExtractConfig(rank=7), UsageError, "exceeds module 'layers.0.conv', whose [6, 4, 3, 3] weight"),
        ("ok", ExtractConfig(rank=4, energy=0.9), UsageError, "exactly one of"),
        ("ok", ExtractConfig(energy=1.5), UsageError, "must be in (0, 1]"),
        ("ok", ExtractConfig(rank=2, max_rank=3), UsageError, "--max-rank needs --energy"),
        ("ok", ExtractConfig(rank=2, targets=("k_proj",)), UsageError, "matches no module"),
        ("ok", ExtractConfig(rank=2, targets=("(",)), UsageError, "not a valid regular expression"),
        ("ok", ExtractConfig(rank=2, dtype="int8"), UsageError, "unknown dtype"),
    ],
)
def test_bad_input_raises_and_writes_nothing(
    tmp_path: Path, case: str, config: ExtractConfig, error: type, text: str
) -> None:
    base, ft = bad_pair(tmp_path, case) if case != "ok" else make_pair(tmp_path)
    with pytest.raises(error) as info:
        extract(base, ft, tmp_path / "out", config)
    assert text in str(info.value) and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_output_rules(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    with pytest.raises(UsageError, match="would overwrite"):
        extract(base, ft, base, ExtractConfig(rank=4))
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        extract(base, ft, tmp_path / "out", ExtractConfig(rank=4))
    extract(base, ft, tmp_path / "out", ExtractConfig(rank=4), force=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    with pytest.raises(loractl.LoractlError, match="nothing to extract"):
        extract(base, base, tmp_path / "same", ExtractConfig(rank=4))


def test_output_is_deterministic(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    extract(base, ft, tmp_path / "a", ExtractConfig(energy=0.95))
    extract(base, ft, tmp_path / "b", ExtractConfig(energy=0.95))
    a, b = (loractl.load_adapter(tmp_path / x) for x in "ab")
    assert a.content_hash() == b.content_hash()


def test_dry_run_reads_headers_only(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    plan = dry_run(base, ft, ExtractConfig(rank=4))
    assert [e.name for e in plan.by_action("lowrank")] == [
        f"{CONV}.weight",
        f"{Q}.weight",
        f"{UP}.weight",
        f"{V}.weight",
    ]
    assert {e.name: e.reason for e in plan.by_action("compare")}["lm_head.weight"].startswith(
        "embedding or output head"
    )


def test_cli_table_json_and_errors(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    runner = CliRunner()
    out = runner.invoke(cli, ["extract", str(base), str(ft), "-o", str(tmp_path / "a"), "--rank", "4"])
    assert out.exit_code == 0, out.output
    assert Q in out.output and "not extracted" in out.output and "norm.weight" in out.output
    js = runner.invoke(cli, ["extract", str(base), str(ft), "-o", str(tmp_path / "b"), "--energy", "0.9", "--json"])
    doc = json.loads(js.stdout)
    assert js.exit_code == 0 and doc["totals"]["modules"] == 3 and doc["not_extracted"][0]["name"] == "norm.weight"
    assert all(0 < m["rank"] <= 4 and math.isfinite(m["rel_error"]) for m in doc["modules"])
    dry = runner.invoke(cli, ["extract", str(base), str(ft), "-o", str(tmp_path / "c"), "--rank", "2", "--dry-run"])
    assert dry.exit_code == 0 and not (tmp_path / "c").exists() and "lowrank" in dry.output
    bad = subprocess.run(
        [sys.executable, "-m", "loractl", "extract", str(base), str(ft), "-o", str(tmp_path / "d"), "--rank", "99"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error: --rank 99 exceeds module" in bad.stderr and "hint: " in bad.stderr


# --- against PEFT: the extracted adapter loads over the base and reproduces the fine-tuned model ---


def llama_pair(tmp_path: Path, fixtures_dir: Path, low_rank: bool) -> tuple[Path, Path]:
    """The tiny Llama fixture and a 'fine-tuned' copy: ΔW on every layer's linear weights, a changed final norm."""
    base = fixtures_dir / "tiny-llama"
    g = torch.Generator().manual_seed(7)
    with Checkpoint(base) as ckpt:
        tensors = {n: ckpt.get(n) for n in ckpt.names}
    for name, w in tensors.items():
        if ".layers." in name and w.ndim == 2:
            d = torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g) if low_rank else None
            tensors[name] = w + 0.02 * (d if d is not None else torch.randn(w.shape, generator=g))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    ft = tmp_path / "ft"
    ft.mkdir()
    save_tensors(ft / "model.safetensors", tensors)
    (ft / "config.json").write_text((base / "config.json").read_text())
    return base, ft


def logits_gap(base: Path, ft: Path, adapter: Path) -> float:
    """max |logits(PEFT(base, adapter)) − logits(fine-tuned)| on a fixed batch."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(ft).eval()(ids).logits
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()
        return float((model(ids).logits - want).abs().max())


def test_peft_loads_extracted_adapter_and_matches_finetuned(tmp_path: Path, fixtures_dir: Path) -> None:
    base, ft = llama_pair(tmp_path, fixtures_dir, low_rank=True)
    report = extract(base, ft, tmp_path / "a", ExtractConfig(rank=4, save_full=("norm",)))
    assert report.totals()["modules"] == 14 and report.totals()["not_extracted"] == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert logits_gap(base, ft, tmp_path / "a") < 1e-4
    extract(base, ft, tmp_path / "b", ExtractConfig(rank=4))  # the final norm is reported, not reproduced
    assert logits_gap(base, ft, tmp_path / "b") > 1e-2


def test_peft_outputs_approach_finetuned_as_rank_grows(tmp_path: Path, fixtures_dir: Path) -> None:
    base, ft = llama_pair(tmp_path, fixtures_dir, low_rank=False)
    gaps = []
    for max_rank in (2, 8, 24, None):
        out = tmp_path / f"r{max_rank}"
        report = extract(base, ft, out, ExtractConfig(energy=1.0, max_rank=max_rank, save_full=("norm",)))
        gaps.append(logits_gap(base, ft, out))
        if max_rank is None:
            assert report.totals()["energy"] >= 1 - 1e-6 and report.totals()["rel_error"] < 1e-3  # ENERGY_TOL
    assert gaps[0] > gaps[1] > gaps[2] > 1e3 * gaps[3]  # energy 1.0 may drop directions under 1e-6 of ‖ΔW‖²
    assert gaps[3] < 1e-3  # logits are up to ~9 here


@pytest.mark.parametrize(
    ("fixture", "config"), [("tiny-qv", ExtractConfig(rank=8)), ("tiny-patterns", ExtractConfig(energy=1.0))]
)
def test_extract_undoes_merge(tmp_path: Path, fixtures_dir: Path, fixture: str, config: ExtractConfig) -> None:
    """extract(base, merge(base, a), rank ≥ r) gives back every ΔW of a (and, by energy, its ranks)."""
    from loractl.ops.merge import merge

    base, source = fixtures_dir / "tiny-llama", fixtures_dir / "adapters" / fixture
    merge(base, [source], tmp_path / "merged")
    adapter = loractl.load_adapter(source)
    result = extract_adapter(base, tmp_path / "merged", config)
    assert set(result.adapter.modules) == set(adapter.modules)
    for name, m in adapter.modules.items():
        assert rel(result.adapter.modules[name].delta_weight(), m.delta_weight()) <= 1e-5, name
        if config.energy is not None:
            assert result.adapter.modules[name].rank == m.rank


def test_swapped_base_and_finetuned_are_refused_as_merge_refuses_a_swap(tmp_path: Path, fixtures_dir: Path) -> None:
    from loractl.ops.merge import RECORD_NAME, merge
    from tests.helpers import run_cli

    base, merged, out = fixtures_dir / "tiny-llama", tmp_path / "merged", tmp_path / "out"
    merge(base, [fixtures_dir / "adapters" / "tiny-qv"], merged)
    code, _, err = run_cli("merge", fixtures_dir / "adapters" / "tiny-qv", base, "-o", tmp_path / "m")
    assert code == 2 and "did you swap" in err  # merge's own swap check
    code, stdout, err = run_cli("extract", merged, base, "-o", out, "--rank", "8")
    lines = err.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 2 and not out.exists(), err  # was: exit 0, −ΔW extracted
    assert "is a merge into" in lines[0] and "did you swap BASE and FINETUNED?" in lines[0]
    assert lines[1] == f"hint: the base comes first: loractl extract {base} {merged} -o OUTPUT"
    assert run_cli("extract", base, merged, "-o", out, "--rank", "8")[0] == 0  # the right order
    (merged / RECORD_NAME).write_text("{not json")  # a damaged record is no evidence: no refusal
    assert run_cli("extract", merged, base, "-o", tmp_path / "x", "--rank", "8")[0] == 0


def test_read_ahead_prepares_in_order_one_ahead_and_surfaces_errors_at_their_item() -> None:
    """The next item is prepared while the caller works on the current one; order and errors are kept."""
    prepared: list[int] = []

    def prepare(i: int) -> int:
        if i == 3:
            raise NumericError("bad item 3")
        prepared.append(i)
        return 10 * i

    seen = []
    with pytest.raises(NumericError, match="bad item 3"), ReadAhead(range(5), prepare) as ahead:
        for item, value in ahead:
            seen.append((item, value))
            if item == 1:
                deadline = time.monotonic() + 5
                while 2 not in prepared and time.monotonic() < deadline:  # item 2 is read while 1 is worked on
                    time.sleep(0.001)
                assert prepared == [0, 1, 2]
    assert seen == [(0, 0), (1, 10), (2, 20)]
    assert prepared in ([0, 1, 2], [0, 1, 2, 4])  # at most one item past the failure, done before the block is left
