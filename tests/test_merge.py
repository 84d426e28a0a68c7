"""merge: numerics against an independent dense reference, the plan, the output, the CLI.

PEFT parity (`merge_and_unload`) lives in test_merge_peft.py; this file needs neither
transformers nor peft.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.errors import IntegrityError, NumericError, OutputExistsError, UsageError
from loractl.io.checkpoint import PER_TENSOR, Checkpoint
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.merge import RECORD_NAME, MergeProgress, merge
from loractl.ops.merge_plan import MergePlanError, plan_merge
from tests.helpers import random_module, raw, run_cli, save, tensors, tiny_base

# ---------------------------------------------------------------- helpers


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".loractl-tmp-" in p.name]


def dense(m: LoraModule, weight: float = 1.0) -> torch.Tensor:
    """ΔW in float64 in the stored layout, written out independently of loractl's kernel."""
    a, b, s = m.A.double(), m.B.double(), m.scale * weight
    if m.kind == "conv":
        return s * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    delta = s * (b @ a)
    return delta.T if (m.kind == "embedding" or m.fan_in_fan_out) else delta


def dora_reference(w: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """PEFT's DoRA merge in float64: m ⊙ (W + ΔW) / ‖W + ΔW‖ over each output feature."""
    assert m.magnitude is not None
    v = w.double() + dense(m)
    mag = m.magnitude.double().reshape(-1)
    if m.kind == "embedding" or m.fan_in_fan_out:
        return v * (mag / v.norm(dim=0)).view(1, -1)
    norm = v.reshape(v.shape[0], -1).norm(dim=1)
    return v * (mag / norm).view(-1, *([1] * (v.ndim - 1)))


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-6) -> None:
    err = (actual.double() - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), err


SHAPES = {
    "lin.weight": (6, 5),
    "lin.bias": (6,),
    "c1d.weight": (5, 7),  # GPT-2 Conv1D: stored (in, out)
    "conv.weight": (4, 3, 3, 3),
    "emb.weight": (10, 6),
    "head.weight": (3, 6),
    "norm.weight": (6,),
    "steps": (2,),
}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tiny_base(tmp_path / "base", {k: v for k, v in SHAPES.items() if k != "steps"})
    with Checkpoint(path) as ckpt:
        data = {n: ckpt.get(n) for n in ckpt.names}
    data["steps"] = torch.tensor([3, 4], dtype=torch.int64)  # an integer tensor travels untouched
    save_tensors(path / "model.safetensors", data)
    (path / "config.json").write_text('{"model_type": "toy", "dtype": "float32"}\n')
    (path / "tokenizer.json").write_text('{"toy": true}\n')
    return path


def conv_module(seed: int, **kw: object) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        A=torch.randn(2, 3, 3, 3, generator=g),
        B=torch.randn(4, 2, 1, 1, generator=g),
        scale=0.5,
        alpha=1.0,
        kind="conv",
        **kw,
    )  # type: ignore[arg-type]


def emb_module(seed: int, **kw: object) -> LoraModule:
    g = torch.Generator().manual_seed(seed)  # A (r, vocab), B (dim, r)
    return LoraModule(
        A=torch.randn(2, 10, generator=g),
        B=torch.randn(6, 2, generator=g),
        scale=0.75,
        alpha=1.5,
        kind="embedding",
        **kw,
    )  # type: ignore[arg-type]


# ---------------------------------------------------------------- numerics


def test_every_variant_matches_the_dense_reference(base: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    plain = Adapter(
        modules={
            "lin": random_module(6, 5, 2, seed=1, bias=torch.randn(6, generator=g)),
            "conv": conv_module(2),
            "emb": emb_module(3),
        },
        full_tensors={"head.weight": torch.randn(3, 6, generator=g)},
    )
    fifo = Adapter(modules={"c1d": random_module(7, 5, 3, seed=4, fan_in_fan_out=True)})
    mag = {"lin": 6, "conv": 4, "emb": 6}
    dora = Adapter(
        modules={
            "lin": random_module(6, 5, 2, seed=5, magnitude=torch.rand(mag["lin"], generator=g) + 0.5),
            "conv": conv_module(6, magnitude=torch.rand(mag["conv"], generator=g) + 0.5),
            "emb": emb_module(8, magnitude=torch.rand(mag["emb"], generator=g) + 0.5),
        }
    )
    fifo_dora = Adapter(
        modules={"c1d": random_module(7, 5, 3, seed=9, fan_in_fan_out=True, magnitude=torch.rand(7, generator=g) + 0.5)}
    )
    w0 = tensors(base)
    for name, adapter in {"plain": plain, "fifo": fifo, "dora": dora, "fifo_dora": fifo_dora}.items():
        out = tmp_path / f"out-{name}"
        merge(base, [save(adapter, tmp_path / name)], out)
        got, loaded = tensors(out), adapter
        for module, m in loaded.modules.items():
            w = w0[f"{module}.weight"]
            want = dora_reference(w, m) if m.magnitude is not None else w.double() + dense(m)
            assert_close64(got[f"{module}.weight"], want)
            if m.bias is not None:
                assert_close64(got[f"{module}.bias"], w0[f"{module}.bias"].double() + m.scale * m.bias.double())
        for key, t in loaded.full_tensors.items():
            assert torch.equal(got[key], t)
        touched = {f"{mod}.weight" for mod in loaded.modules} | set(loaded.full_tensors)
        touched |= {f"{mod}.bias" for mod, m in loaded.modules.items() if m.bias is not None}
        assert all(torch.equal(got[k], w0[k]) for k in w0 if k not in touched)


def test_weighted_adapters_and_negative_weights(base: Path, tmp_path: Path) -> None:
    a = Adapter(modules={"lin": random_module(6, 5, 2, seed=1), "emb": emb_module(2)})
    b = Adapter(modules={"lin": random_module(6, 5, 4, seed=3, alpha=3.0)})
    pa, pb = save(a, tmp_path / "a"), save(b, tmp_path / "b")
    merge(base, [pa, pb], tmp_path / "out", weights=[0.5, -2.0])
    w0, got = tensors(base), tensors(tmp_path / "out")
    want = w0["lin.weight"].double() + dense(a.modules["lin"], 0.5) + dense(b.modules["lin"], -2.0)
    assert_close64(got["lin.weight"], want)
    assert_close64(got["emb.weight"], w0["emb.weight"].double() + dense(a.modules["emb"], 0.5))


@settings(max_examples=12)
@given(
    out=st.integers(1, 24),
    inp=st.integers(1, 24),
    rank=st.integers(1, 6),
    alpha=st.floats(0.25, 64),
    seed=st.integers(0, 2**16),
)
def test_property_merge_minus_base_is_scaled_product(out: int, inp: int, rank: int, alpha: float, seed: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base = tiny_base(root / "base", {"m.weight": (out, inp)}, seed=seed)
        module = random_module(out, inp, rank, alpha=alpha, seed=seed + 1)
        adapter = save(Adapter(modules={"m": module}), root / "a")
        merge(base, [adapter], root / "once")
        w0, w1 = tensors(base)["m.weight"], tensors(root / "once")["m.weight"]
        scale = module.scale
        want = scale * (module.B.double() @ module.A.double())
        tol = 4 * torch.finfo(torch.float32).eps * (w0.abs().max().item() + want.abs().max().item())
        assert ((w1.double() - w0.double()) - want).abs().max().item() <= tol
        merge(base, [adapter, adapter], root / "undo", weights=[1.0, -1.0])
        back = tensors(root / "undo")["m.weight"]
        assert (back.double() - w0.double()).abs().max().item() <= tol


def test_bfloat16_base_is_updated_in_float32_and_cast_once(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", {"m.weight": (16, 12)}, dtype=torch.bfloat16)
    module = random_module(16, 12, 4, seed=2, alpha=0.5)
    merge(base, [save(Adapter(modules={"m": module}), tmp_path / "a")], tmp_path / "out")
    got = tensors(tmp_path / "out")["m.weight"]
    assert got.dtype == torch.bfloat16
    want = (tensors(base)["m.weight"].double() + dense(module)).to(torch.bfloat16)  # one rounding
    assert torch.equal(got, want)


# ---------------------------------------------------------------- output


def test_sharded_in_sharded_out_untouched_bit_exact(tmp_path: Path) -> None:
    shapes = {f"model.layers.{i}.{p}.weight": (8, 8) for i in range(4) for p in ("q", "k")}
    single = tiny_base(tmp_path / "single", shapes)
    from loractl.io.checkpoint_writer import write_sharded
    from loractl.io.safetensors_writer import TensorSpec

    w0 = tensors(single)
    specs = [TensorSpec(n, "F32", (8, 8)) for n in w0]
    sharded = tmp_path / "sharded"
    write_sharded(sharded, specs, w0.__getitem__, 3 * 8 * 8 * 4)  # 3 tensors per shard
    assert len(Checkpoint(sharded).headers) == 3
    adapter = save(Adapter(modules={"model.layers.1.q": random_module(8, 8, 2)}), tmp_path / "a")
    report = merge(sharded, [adapter], tmp_path / "out")
    assert len(report.shards) == 3 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    before, after = raw(sharded), raw(tmp_path / "out")
    assert set(before) == set(after)
    assert [n for n in before if before[n] != after[n]] == ["model.layers.1.q.weight"]
    one = merge(sharded, [adapter], tmp_path / "one", max_shard_size="1MB")
    assert one.shards == ("model.safetensors",)
    many = merge(sharded, [adapter], tmp_path / "many", max_shard_size=8 * 8 * 4)
    assert len(many.shards) == len(shapes)


def test_output_files_config_record_and_determinism(base: Path, tmp_path: Path) -> None:
    (base / "pytorch_model.bin").write_bytes(b"stale weights")
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    report = merge(base, [adapter], tmp_path / "one", dtype="bfloat16")
    merge(base, [adapter], tmp_path / "two", dtype="bf16")
    one, two = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert names == ["config.json", RECORD_NAME, "model.safetensors", "tokenizer.json"]
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    assert (one / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((one / "config.json").read_text())["dtype"] == "bfloat16"
    got = tensors(one)
    assert got["steps"].dtype == torch.int64 and got["norm.weight"].dtype == torch.bfloat16
    record = json.loads((one / RECORD_NAME).read_text())
    assert record["adapters"][0]["base_fingerprint"] == report.fingerprints[0]
    with Checkpoint(base) as ckpt:
        assert report.fingerprints[0] == ckpt.fingerprint(["lin.weight"], scheme=PER_TENSOR)  # no record to match
    assert report.tensors_checked == len(SHAPES)
    assert [p.name for p in report.plan.skipped_files] == ["pytorch_model.bin"]


def test_tied_head_is_untied_explicitly(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", {"model.embed_tokens.weight": (12, 8), "model.norm.weight": (8,)})
    (base / "config.json").write_text('{"tie_word_embeddings": true, "vocab_size": 12}\n')
    module = random_module(12, 8, 2, seed=3)
    adapter = save(Adapter(modules={"lm_head": module}), tmp_path / "a")
    plan = plan_merge(base, [adapter])
    assert plan.untied == ["lm_head.weight"] and plan.config_updates == {"tie_word_embeddings": False}
    merge(base, [adapter], tmp_path / "out")
    w0, got = tensors(base), tensors(tmp_path / "out")
    assert torch.equal(got["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])  # embeddings unchanged
    assert_close64(got["lm_head.weight"], w0["model.embed_tokens.weight"].double() + dense(module))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {
        "tie_word_embeddings": False,
        "vocab_size": 12,
    }
    code, out, _ = run_cli("merge", base, adapter, "--dry-run")
    assert code == 0 and "untie: lm_head.weight" in out


def test_progress_reports_every_tensor_and_byte(base: Path, tmp_path: Path) -> None:
    seen: list[MergeProgress] = []
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    merge(base, [adapter], tmp_path / "out", progress=seen.append)
    assert len(seen) == len(SHAPES)
    data_bytes = (tmp_path / "out" / "model.safetensors").stat().st_size - _header_size(tmp_path / "out")
    assert seen[-1].bytes_done == seen[-1].bytes_total == data_bytes


def _header_size(out: Path) -> int:
    with (out / "model.safetensors").open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# ---------------------------------------------------------------- bad input


def test_every_mismatch_is_listed_and_nothing_written(base: Path, tmp_path: Path) -> None:
    adapter = Adapter(
        modules={
            "missing": random_module(6, 5, 2, seed=1),
            "lin": random_module(5, 6, 2, seed=2),  # transposed: a shape mismatch
            "norm": random_module(6, 6, 2, seed=3),  # a 1-D base tensor
            "head": random_module(3, 6, 2, seed=4, bias=torch.ones(3)),  # the base head has no bias
        },
        full_tensors={"nowhere.weight": torch.zeros(2)},
    )
    path = save(adapter, tmp_path / "bad")
    plan = plan_merge(base, [path])
    codes = sorted(p.code for p in plan.problems)
    assert codes == ["bias-not-in-base", "not-in-base", "not-in-base", "shape-mismatch", "shape-mismatch"]
    with pytest.raises(MergePlanError) as e:
        merge(base, [path], tmp_path / "out")
    assert "'lin'" in str(e.value) and "(6, 5)" in str(e.value) and "'missing'" in str(e.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    code, _, err = run_cli("merge", base, path, "-o", tmp_path / "out")
    assert code == 1 and err.startswith("error: the merge plan has 5 problems") and "hint:" in err
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_is_refused(base: Path, tmp_path: Path) -> None:
    adapter = Adapter(modules={"lin": random_module(6, 5, 2)}, meta=AdapterMeta(base_fingerprint="sha256:" + "0" * 64))
    path = save(adapter, tmp_path / "a")
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(base, [path], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with Checkpoint(base) as ckpt:  # the right fingerprint is accepted
        right = ckpt.fingerprint(["lin.weight"])
    ok = save(Adapter(modules=adapter.modules, meta=AdapterMeta(base_fingerprint=right)), tmp_path / "ok")
    merge(base, [ok], tmp_path / "out")


def test_nan_fails_and_writes_nothing(base: Path, tmp_path: Path) -> None:
    m = random_module(6, 5, 2)
    bad = LoraModule(A=m.A, B=torch.full_like(m.B, math.nan), scale=m.scale, alpha=m.alpha)
    path = save(Adapter(modules={"lin": bad}), tmp_path / "a")
    with pytest.raises(NumericError, match=r"'lin\.weight' contains NaN"):
        merge(base, [path], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_truncated_base_shard(base: Path, tmp_path: Path) -> None:
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    code, _, err = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert code == 1 and "truncated" in err and not (tmp_path / "out").exists()


def test_unwritable_output(base: Path, tmp_path: Path) -> None:
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    if os.geteuid() == 0:  # root writes through permission bits: use a path the kernel refuses
        target = Path("/sys/loractl-merge-test")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    code, _, err = run_cli("merge", base, adapter, "-o", target)
    assert code == 1 and err.startswith("error: ") and "cannot write /sys/loractl-merge-test" in err and "hint:" in err
    assert not target.exists() and not leftovers(target.parent)


def test_existing_output_needs_force_and_inputs_are_protected(base: Path, tmp_path: Path) -> None:
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(OutputExistsError):
        merge(base, [adapter], tmp_path / "out")
    merge(base, [adapter], tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "old").exists()
    with pytest.raises(UsageError, match="overwrite the input"):
        merge(base, [adapter], base / "merged")
    code, _, err = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert code == 2 and "already exists" in err


# ---------------------------------------------------------------- CLI


def test_cli_dry_run_json_and_usage_errors(base: Path, tmp_path: Path) -> None:
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2), "conv": conv_module(1)}), tmp_path / "a")
    code, out, _ = run_cli("merge", base, adapter, adapter, "--weight", "1", "--weight", "-1", "--dry-run", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["counts"] == {"merge": 2, "replace": 0, "untie": 0, "copy": len(SHAPES) - 2}
    assert [a["weight"] for a in doc["adapters"]] == [1.0, -1.0] and doc["problems"] == []
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
    bad = save(Adapter(modules={"nope": random_module(6, 5, 2)}), tmp_path / "bad")
    code, out, _ = run_cli("merge", base, bad, "--dry-run", "--json")
    assert code == 1 and json.loads(out)["problems"][0]["code"] == "not-in-base"
    code, _, err = run_cli("merge", base, adapter, "--weight", "1", "--weight", "2", "-o", tmp_path / "o")
    assert code == 2 and "2 weights for 1 adapters" in err
    code, _, err = run_cli("merge", base, adapter)
    assert code == 2 and "missing -o/--output" in err
    code, _, err = run_cli("merge", base, adapter, "-o", tmp_path / "o", "--dtype", "int3")
    assert code == 2 and "unknown dtype" in err


def test_cli_merge_json_report(base: Path, tmp_path: Path) -> None:
    adapter = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    code, out, _ = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["tensors_checked"] == len(SHAPES) and doc["nonfinite"] == 0
    (mod,) = doc["modules"]
    w = tensors(base)["lin.weight"].double()
    m = random_module(6, 5, 2)
    assert mod["relative_delta"] == pytest.approx((dense(m).norm() / w.norm()).item(), rel=1e-6)
    code, out, _ = run_cli("merge", base, adapter, "-o", tmp_path / "out2")
    assert code == 0 and "no NaN/Inf" in out and "‖ΔW‖/‖W‖" in out


def test_cli_module_and_dry_run_do_not_import_torch(fixtures_dir: Path) -> None:
    """Nor does the merge module itself: `execute_merge` starts hashing the base before importing torch."""
    adapter = fixtures_dir / "adapters" / "tiny-qv"
    code = (
        "import sys; from loractl.cli import main\n"
        f"try: main(['merge', {str(fixtures_dir / 'tiny-llama')!r}, {str(adapter)!r}, '--dry-run', '--json'])\n"
        "except SystemExit as e: assert not e.code\n"
        "import loractl.ops.merge\n"
        "sys.exit('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["merge"] == 4


def test_merging_into_a_merge_keeps_its_record(base: Path, tmp_path: Path) -> None:
    a = save(Adapter(modules={"lin": random_module(6, 5, 2)}), tmp_path / "a")
    b = save(Adapter(modules={"emb": emb_module(1)}), tmp_path / "b")
    merge(base, [a], tmp_path / "one")
    merge(tmp_path / "one", [b], tmp_path / "two")
    record = json.loads((tmp_path / "two" / RECORD_NAME).read_text())
    first = json.loads((tmp_path / "one" / RECORD_NAME).read_text())
    assert record["base_record"] == first and record["modules"][0]["module"] == "emb"
