"""inspect and validate: library results, CLI behaviour, bad input, no torch on the header path."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loractl
from loractl.cli import cli
from loractl.formats.options import ReadOptions
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_header import read_header
from loractl.io.safetensors_writer import save_tensors
from loractl.lineage import new_entry
from tests.helpers import qv_adapter

QV = "model.layers.0.self_attn.q_proj"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point in a subprocess: exit code and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "loractl", *args], capture_output=True, text=True)


def copy_fixture(fixtures_dir: Path, tmp_path: Path, name: str = "tiny-qv") -> Path:
    dst = tmp_path / name
    shutil.copytree(fixtures_dir / "adapters" / name, dst)
    return dst


def rewrite_weights(adapter_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Re-save the adapter's tensors after `edit(tensors)` (keeps the file's metadata)."""
    path = adapter_dir / "adapter_model.safetensors"
    with Checkpoint(path) as ckpt:  # copies, not views of the file we are about to overwrite
        tensors = {k: ckpt.get(k) for k in ckpt.names}
    metadata = read_header(path).metadata
    edit(tensors)
    save_tensors(path, tensors, metadata)


def test_inspect_reports_patterns_scales_and_flags(fixtures_dir: Path) -> None:
    doc = loractl.inspect_adapter(fixtures_dir / "adapters" / "tiny-patterns").to_dict()
    assert doc["format"] == "peft" and doc["modules"] == 14 and doc["rslora"]
    by_pattern = {p["pattern"]: p for p in doc["patterns"]}
    v = by_pattern["model.layers.{0..1}.self_attn.v_proj"]
    assert v["rank"] == 2 and v["scale"] == pytest.approx(8 / 2**0.5)
    assert by_pattern["model.layers.0.self_attn.q_proj"]["scale"] == pytest.approx(16 / 2)
    assert sum(p["count"] for p in doc["patterns"]) == 14


def test_inspect_stats_computes_norms_from_factors(fixtures_dir: Path) -> None:
    report = loractl.inspect_adapter(fixtures_dir / "adapters" / "tiny-qv", stats=True)
    adapter = loractl.load_adapter(fixtures_dir / "adapters" / "tiny-qv")
    dense = adapter.modules[QV].delta_weight().double().norm().item()
    assert report.stats is not None and report.stats[QV].delta_norm == pytest.approx(dense, rel=1e-9)
    assert report.computed_hash == adapter.content_hash()


def test_inspect_shows_recorded_hash_and_lineage_without_stats(tmp_path: Path) -> None:
    adapter = qv_adapter().with_lineage(new_entry("test", {"k": 1}, []))
    loractl.save_adapter(adapter, tmp_path / "a")
    doc = loractl.inspect_adapter(tmp_path / "a").to_dict()
    assert doc["content_hash"]["recorded"] == adapter.content_hash()
    assert [e["op"] for e in doc["lineage"]] == ["test"]


def test_header_path_does_not_import_torch(fixtures_dir: Path) -> None:
    code = (
        "import sys; from loractl.cli import main\n"
        "try: main(['inspect', sys.argv[1], '--json'])\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by inspect'\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(fixtures_dir / "adapters" / "tiny-qv")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.split("\nUsage")[0])["modules"] == 4


def _without_torch(*argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `loractl ARGV…` in a fresh interpreter that fails if torch gets imported."""
    code = (
        "import sys; from loractl.cli import main\n"
        "try: main(sys.argv[1:])\n"
        "except SystemExit as e: code = e.code\n"
        "else: code = 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    return done.returncode, done.stderr


def test_errors_that_need_no_torch_do_not_import_it(fixtures_dir: Path, tmp_path: Path) -> None:
    """An unknown --to or an existing output fails in the time it takes to say so (torch takes seconds)."""
    qv, base, out = str(fixtures_dir / "adapters" / "tiny-qv"), str(fixtures_dir / "tiny-llama"), str(tmp_path)
    data = str(fixtures_dir / "data" / "train.jsonl")
    cases = [
        ["convert", qv, "-o", str(tmp_path / "new"), "--to", "safetensors"],
        ["resize", qv, "-o", str(tmp_path / "new"), "--rank", "1", "--to", "safetensors"],
        ["convert", qv, "-o", out, "--to", "kohya"],
        ["resize", qv, "-o", out, "--rank", "1"],
        ["combine", qv, qv, "-o", out],
        ["rescale", qv, "-o", out, "--to-scale", "0.5"],
        ["merge", base, qv, "-o", out],
        ["extract", base, base, "-o", out, "--rank", "1"],
        ["convert", "no-such-adapter", "-o", str(tmp_path / "new"), "--to", "peft"],
        ["resize", "no-such-adapter", "-o", str(tmp_path / "new"), "--rank", "1"],
        ["combine", qv, "no-such-adapter", "-o", str(tmp_path / "new")],
        ["extract", "no-such-adapter", base, "-o", str(tmp_path / "new"), "--rank", "1"],
        ["rescale", qv, "-o", str(tmp_path / "new"), "--to-scale", "0.5", "--from", "kohyaa"],
        ["diff", qv, "no-such-adapter"],
        ["eval", base, qv, "no-such-adapter", "--data", data],
        ["eval", base, qv, "--data", "no-such-data.jsonl"],
        ["train", "--base", base, "--data", "no-such-data.jsonl", "-o", str(tmp_path / "new")],
        ["train", "--base", base, "--data", data, "-o", out],
    ]
    told = ("already exists", "unknown target", "does not exist", "unknown format")
    for argv in cases:
        code, err = _without_torch(*argv)
        assert code == 2 and err.startswith("error: ") and any(t in err for t in told), (argv, err)


def test_header_only_inspect_of_an_npz_does_not_import_torch(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    leaves = {"lora_a": rng.standard_normal((8, 2), dtype=np.float32), "lora_b": np.ones((2, 6), np.float16)}
    np.savez(tmp_path / "adapters.npz", **{f"layers.0.attention.wq.{k}": v for k, v in leaves.items()})
    code, err = _without_torch("inspect", str(tmp_path / "adapters.npz"), "--scale", "2", "--json")
    assert code == 0, err
    info = loractl.describe_adapter(tmp_path / "adapters.npz", options=ReadOptions(scale=2.0))
    assert info.dtypes == ["F16", "F32"] and info.modules["layers.0.attention.wq"].rank == 2


def test_validate_clean_fixtures_against_base(fixtures_dir: Path) -> None:
    for name in ("tiny-qv", "tiny-patterns", "tiny-dora"):
        report = loractl.validate_adapter(fixtures_dir / "adapters" / name, base=fixtures_dir / "tiny-llama")
        assert report.findings == [], name


def test_validate_real_gpt2_fan_in_fan_out(real_adapters: Path) -> None:
    path = real_adapters / "peft-gpt2-seqcls-fanin"
    info = loractl.describe_adapter(path)
    assert len(info.modules) == 12 and all(
        m.fan_in_fan_out and m.rank == 8 and m.scale == 1.0 for m in info.modules.values()
    )
    assert list(info.full_tensors) == ["score.weight"]
    assert loractl.validate_adapter(path).findings == []


def _codes(path: Path, **kw: object) -> set[str]:
    return {f.code for f in loractl.validate_adapter(path, **kw).findings}  # type: ignore[arg-type]


def test_validate_finds_nan_missing_b_and_config_disagreement(fixtures_dir: Path, tmp_path: Path) -> None:
    a = copy_fixture(fixtures_dir, tmp_path)

    def damage(t: dict[str, torch.Tensor]) -> None:
        t[f"base_model.model.{QV}.lora_A.weight"][0, 0] = float("nan")
        del t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
        t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.bias"] = torch.zeros(64)

    rewrite_weights(a, damage)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert {"nonfinite", "missing-b", "bias-config", "dora-magnitude"} <= _codes(a)


def test_validate_detects_tampering_through_the_content_hash(tmp_path: Path) -> None:
    loractl.save_adapter(qv_adapter(), tmp_path / "a")
    rewrite_weights(tmp_path / "a", lambda t: t[f"base_model.model.{QV}.lora_B.weight"].mul_(2))
    assert "hash-mismatch" in _codes(tmp_path / "a")


def test_validate_against_wrong_base(fixtures_dir: Path, tmp_path: Path) -> None:
    loractl.save_adapter(qv_adapter(hidden=16), tmp_path / "a")
    assert "base-shape" in _codes(tmp_path / "a", base=fixtures_dir / "tiny-llama")


def test_validate_rank_mismatch(fixtures_dir: Path, tmp_path: Path) -> None:
    a = copy_fixture(fixtures_dir, tmp_path)
    rewrite_weights(a, lambda t: t.update({f"base_model.model.{QV}.lora_B.weight": torch.zeros(64, 3)}))
    assert "rank-mismatch" in _codes(a)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
        (lambda p: p.write_bytes((10**9).to_bytes(8, "little") + p.read_bytes()[8:]), "header length"),
        (lambda p: p.write_bytes(p.read_bytes().replace(b'"data_offsets":[0,', b'"data_offsets":[8,', 1)), "offsets"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(fixtures_dir: Path, tmp_path: Path, damage, needle) -> None:  # type: ignore[no-untyped-def]
    a = copy_fixture(fixtures_dir, tmp_path)
    weights = a / "adapter_model.safetensors"
    damage(weights)
    before = _sha(weights)
    out = run("inspect", str(a))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith("error: ") and str(weights) in first and needle in first
    v = run("validate", str(a), "--format", "json")
    assert v.returncode == 1 and json.loads(v.stdout)["reports"][0]["findings"][0]["code"] == "unreadable"
    assert _sha(weights) == before  # inputs are never modified


def test_non_json_config_and_pickle_refusal(fixtures_dir: Path, tmp_path: Path) -> None:
    a = copy_fixture(fixtures_dir, tmp_path)
    (a / "adapter_config.json").write_text("{not json")
    out = run("inspect", str(a))
    assert out.returncode == 1 and "adapter_config.json" in out.stderr and "not valid JSON" in out.stderr
    b = copy_fixture(fixtures_dir, tmp_path, "tiny-dora")
    with Checkpoint(b / "adapter_model.safetensors") as ckpt:
        torch.save({k: ckpt.get(k) for k in ckpt.names}, b / "adapter_model.bin")
    (b / "adapter_model.safetensors").unlink()
    out = run("inspect", str(b))
    assert out.returncode == 1 and "pickle" in out.stderr and "--allow-pickle" in out.stderr
    assert run("inspect", str(b), "--allow-pickle", "--json").returncode == 0


def test_cli_validate_exit_codes_and_github_annotations(fixtures_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(fixtures_dir / "adapters" / "tiny-qv")])
    assert ok.exit_code == 0 and "ok" in ok.output
    a = copy_fixture(fixtures_dir, tmp_path)
    rewrite_weights(a, lambda t: t[f"base_model.model.{QV}.lora_A.weight"].fill_(float("inf")))
    bad = runner.invoke(cli, ["validate", str(a), str(fixtures_dir / "adapters" / "tiny-qv"), "--format", "github"])
    assert bad.exit_code == 1
    assert bad.output.startswith("::error file=") and "title=loractl nonfinite" in bad.output
    usage = runner.invoke(cli, ["validate"])
    assert usage.exit_code == 2


def test_strict_makes_warnings_fail(tmp_path: Path) -> None:
    adapter = qv_adapter(hidden=4, rank=6)  # rank above min(in, out): a warning
    loractl.save_adapter(adapter, tmp_path / "a")
    runner = CliRunner()
    assert runner.invoke(cli, ["validate", str(tmp_path / "a")]).exit_code == 0
    strict = runner.invoke(cli, ["validate", str(tmp_path / "a"), "--strict", "--json"])
    assert strict.exit_code == 1 and json.loads(strict.output)["reports"][0]["findings"][0]["code"] == "rank-too-high"


def test_unknown_file_is_refused_with_sample_keys(tmp_path: Path) -> None:
    save_tensors(tmp_path / "x.safetensors", {f"weird.key{i}": torch.zeros(2) for i in range(9)})
    out = run("inspect", str(tmp_path / "x.safetensors"))
    assert out.returncode == 1 and "weird.key0" in out.stderr and "hint:" in out.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    out = run("--debug", "inspect", str(tmp_path / "missing"))
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_inspect_shows_where_a_pulled_adapter_came_from(tmp_path: Path) -> None:
    from loractl.remote import pull, push

    loractl.save_adapter(qv_adapter(), tmp_path / "a")
    repo = f"file://{tmp_path}/registry/alice/lora"
    pushed = push(tmp_path / "a", repo, tag="v1", create=True)
    pull(repo + "@v1", tmp_path / "pulled")
    report = loractl.inspect_adapter(tmp_path / "pulled")
    assert report.origin is not None and report.origin["commit"] == pushed.sha
    out = CliRunner().invoke(cli, ["inspect", str(tmp_path / "pulled")])
    line = next(x for x in out.output.splitlines() if x.startswith("pulled  "))
    assert pushed.sha[:12] in line and "changed" not in out.output
    assert f"verified {pushed.content_hash[:19]}" in line  # the hash pull checked, not one computed now


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_scan_counts_across_blocks_smaller_than_a_row(
    dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan reads raw blocks of SCAN_BYTES whatever the row length (a hostile file's 256 MiB rows once took
    512 MB): made tiny here, every count must still equal torch's."""
    import loractl.validation as validation

    monkeypatch.setattr(validation, "SCAN_BYTES", 40)
    t = torch.randn(3, 50).to(dtype)
    t.view(-1)[[0, 7, 19, 20, 149]] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan"), 1e30]).to(
        dtype
    )
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": t, "b": torch.ones(4, 4, dtype=dtype), "empty": torch.ones(0, 4, dtype=dtype)})
    expected = int((~torch.isfinite(t)).sum())
    assert validation._nonfinite_tensors(path) == [("a", expected)]
