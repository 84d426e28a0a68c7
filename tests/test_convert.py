"""`convert`: every pair of formats keeps ΔW, losses are listed or refused, a failed check writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loractl import lineage
from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.errors import AdapterError, NumericError, UsageError
from loractl.formats import kohya, load_adapter, save_adapter
from loractl.io.safetensors_header import read_header
from loractl.ops.convert import convert, plan_conversion
from loractl.ops.convert_verify import delta_error, verify
from tests.helpers import random_module, run_cli

FORMATS = ("peft", "kohya", "diffusers", "mlx")
SUFFIX = {"kohya": ".safetensors", "diffusers": ".safetensors"}
PATHS = [f"unet.down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.{p}" for i in (0, 1) for p in ("to_q", "to_k")]


def _path(root: Path, name: str, fmt: str) -> Path:
    return root / (name + SUFFIX.get(fmt, ""))


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    """Linear LoRA every format holds: mixed ranks, per-module alphas, rsLoRA, float32 or bf16."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    names = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=4, unique=True))
    modules = {}
    for i, name in enumerate(names):
        rank, alpha = draw(st.integers(1, 5)), draw(st.sampled_from([4.0, 16.0, 0.5, 1 / 3]))
        m = random_module(draw(st.integers(2, 6)), draw(st.integers(2, 6)), rank, alpha=alpha, dtype=dtype, seed=i)
        if draw(st.booleans()):
            m = LoraModule(A=m.A, B=m.B, scale=alpha / rank**0.5, alpha=alpha, scale_rule="alpha/sqrt(r)")
        modules[name] = m
    return Adapter(modules=modules, meta=AdapterMeta(base_model="tiny"))


@settings(max_examples=12)
@given(adapters(), st.sampled_from(FORMATS), st.sampled_from(FORMATS), st.sampled_from(FORMATS))
def test_every_pair_keeps_delta_weight(
    tmp_path_factory: pytest.TempPathFactory, adapter: Adapter, first: str, second: str, third: str
) -> None:
    """source (first) → second → third → first: ΔW per module within the target dtype's rounding."""
    root = tmp_path_factory.mktemp("c")
    src = save_adapter(adapter, _path(root, "src", first), format=first)
    hops = [(src, first)]
    for i, fmt in enumerate((second, third, first)):
        out = _path(root, f"hop{i}", fmt)
        report = convert(hops[-1][0], out, to=fmt)
        assert report.verified and report.lost == () and report.modules == len(adapter.modules)
        hops.append((out, fmt))
    back = load_adapter(hops[-1][0], format=first)
    tol = 1e-6 if adapter.modules[next(iter(adapter.modules))].A.dtype == torch.float32 else 2**-7
    for name, m in adapter.modules.items():
        assert delta_error(m, back.modules[name]) <= tol, (name, first, second, third)


def test_peft_kohya_peft_is_bit_exact(tmp_path: Path, fixtures_dir: Path) -> None:
    src = fixtures_dir / "adapters" / "tiny-patterns"
    report = convert(src, tmp_path / "k.safetensors", to="kohya")
    assert report.folded == ("rsLoRA's alpha/√r folded into the stored alpha or scale",)  # the fixture uses rsLoRA
    convert(tmp_path / "k.safetensors", tmp_path / "back", to="peft")
    a, b = load_adapter(src), load_adapter(tmp_path / "back")
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        got = b.modules[name]
        assert torch.equal(got.A, m.A) and torch.equal(got.B, m.B) and got.scale == m.scale
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["rank_pattern"]  # same scales, written as alpha/r


@pytest.mark.parametrize(
    ("relative", "fmt"),
    [("mlx-lm-qwen2.5-0.5b", "peft"), ("diffusers-loradot-sd15-and-misconverted/2100-lora.safetensors", "peft"),
     ("mlx-lm-qwen2.5-0.5b", "kohya"), ("diffusers-loradot-sd15-and-misconverted/2100-lora.safetensors", "kohya")],
)  # fmt: skip
def test_real_files_to_and_back(tmp_path: Path, real_adapters: Path, relative: str, fmt: str) -> None:
    src = real_adapters / relative
    source = load_adapter(src)
    mid = _path(tmp_path, "mid", fmt)
    convert(src, mid, to=fmt)
    back_fmt = "mlx" if src.is_dir() else "diffusers"
    back = _path(tmp_path, "back", back_fmt)
    report = convert(mid, back, to=back_fmt)
    assert report.max_error == 0.0  # the factors come back bit for bit: no rounding floor
    again = load_adapter(back)  # and the factors themselves come back bit for bit:
    assert set(again.modules) == set(source.modules)
    for name, m in source.modules.items():
        assert torch.equal(again.modules[name].A, m.A) and torch.equal(again.modules[name].B, m.B)
        assert again.modules[name].scale == m.scale


def test_losses_are_refused_unless_allowed(tmp_path: Path, fixtures_dir: Path) -> None:
    src = fixtures_dir / "adapters" / "tiny-dora"
    with pytest.raises(AdapterError, match="DoRA magnitudes"):
        convert(src, tmp_path / "l.pt", to="loralib")
    assert not (tmp_path / "l.pt").exists()
    report = convert(src, tmp_path / "l.pt", to="loralib", allow_loss=True)
    assert [(x.what, x.count) for x in report.lost] == [("DoRA magnitudes", 4)] and report.verified


def test_plan_folds_for_mlx_and_drops_what_kohya_cannot_hold() -> None:
    mods = {"unet.a.to_q": random_module(4, 4, 2, alpha=2.0), "unet.a.to_k": random_module(4, 4, 3, alpha=9.0, seed=1),
            "model.embed_tokens": LoraModule(A=torch.ones(2, 10), B=torch.ones(4, 2), scale=1.0, kind="embedding")}  # fmt: skip
    adapter = Adapter(modules=mods, full_tensors={"lm_head.weight": torch.ones(2, 2)})
    mlx = plan_conversion(adapter, "mlx")
    assert len(mlx.folded) == 2 and [(x.what, x.count) for x in mlx.lost] == [("full tensors", 1)]
    k = plan_conversion(adapter, "kohya")
    assert "model.embed_tokens" not in k.adapter.modules and not k.adapter.full_tensors
    assert {(x.what, x.count) for x in k.lost} == {("embedding LoRA modules", 1), ("full tensors", 1)}
    assert k.folded == ()


def test_failed_verification_writes_nothing(
    tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = kohya.write

    def corrupting(adapter: Adapter, path: Path, **kw: object) -> Path:
        name, m = next(iter(adapter.modules.items()))
        bad = LoraModule(A=m.A, B=m.B * 1.001, scale=m.scale, alpha=m.alpha)
        return original(Adapter(modules={**adapter.modules, name: bad}), path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kohya, "write", corrupting)
    with pytest.raises(NumericError, match=r"differs by 0\.001"):
        convert(fixtures_dir / "adapters" / "tiny-qv", tmp_path / "k.safetensors", to="kohya")
    assert list(tmp_path.iterdir()) == []
    report = convert(fixtures_dir / "adapters" / "tiny-qv", tmp_path / "k.safetensors", to="kohya", verify_output=False)
    assert not report.verified and (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("rank", [5, 6, 7, 9, 14])
def test_identical_factors_report_exactly_zero(rank: int) -> None:
    """A Gram expansion of ‖s B A − s B A‖ left ~5e-9 at these ranks; equal factors are exactly 0, as in diff."""
    from loractl.ops.diff import diff

    m = random_module(200, 150, rank, seed=0)
    assert delta_error(m, m) == 0.0
    copy = LoraModule(A=m.A.clone(), B=(m.B * 2).clone(), scale=m.scale / 2)  # the same s·B, factors not bit-equal
    assert delta_error(m, copy) == 0.0 and diff(Adapter(modules={"x": m}), Adapter(modules={"x": copy})).change == 0.0
    near = LoraModule(A=m.A, B=m.B, scale=m.scale * (1 + 1e-12))  # a real difference stays measurable
    assert delta_error(m, near) == pytest.approx(1e-12, rel=1e-3)


def test_verify_measures_relative_frobenius_error() -> None:
    m = random_module(7, 5, 3)
    scaled = LoraModule(A=m.A, B=m.B, scale=m.scale * (1 + 1e-3))
    assert delta_error(m, scaled) == pytest.approx(1e-3, rel=1e-6)
    dense = (scaled.delta_weight(torch.float64) - m.delta_weight(torch.float64)).norm() / m.delta_weight(
        torch.float64
    ).norm()
    assert delta_error(m, scaled) == pytest.approx(float(dense), rel=1e-6)  # against the dense reference
    check = verify(Adapter(modules={"x": m}), Adapter(modules={"x": scaled, "y": m}))
    assert any("appeared" in p for p in check.problems) and any("differs" in p for p in check.problems)


def test_lineage_and_usage_errors(tmp_path: Path, fixtures_dir: Path) -> None:
    src = fixtures_dir / "adapters" / "tiny-qv"
    convert(src, tmp_path / "k.safetensors", to="kohya")
    record = lineage.decode(read_header(tmp_path / "k.safetensors").metadata)
    assert record is not None and record.lineage[-1]["op"] == "convert"
    assert record.lineage[-1]["parents"] == [load_adapter(src).content_hash()]
    with pytest.raises(UsageError, match="unknown target"):
        convert(src, tmp_path / "x", to="onnx")
    with pytest.raises(UsageError, match="overwrite the input"):
        convert(src, src, to="peft")


def test_cli(tmp_path: Path, fixtures_dir: Path, real_adapters: Path) -> None:
    code, out, _ = run_cli("convert", fixtures_dir / "adapters" / "tiny-qv", "-o", tmp_path / "k.safetensors",
                           "--to", "kohya", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["max_error"] == 0.0
    bad = real_adapters / "diffusers-loradot-sd15-and-misconverted" / "new.safetensors"
    code, _, err = run_cli("convert", bad, "-o", tmp_path / "p", "--to", "peft")
    assert code == 1 and "malformed suffix '_lora_" in err and "hint:" in err
    assert not (tmp_path / "p").exists()
    foreign = tmp_path / "foreign.safetensors"
    from loractl.io.safetensors_writer import save_tensors

    save_tensors(foreign, {"lycoris_model_conv_out_proj.lora_down.weight": torch.ones(1, 2),
                           "lycoris_model_conv_out_proj.lora_up.weight": torch.ones(2, 1)})  # fmt: skip
    code, _, err = run_cli("convert", foreign, "-o", tmp_path / "q", "--to", "peft")
    assert code == 2 and "--base" in err and not (tmp_path / "q").exists()
    code, out, err = run_cli("convert", fixtures_dir / "adapters" / "tiny-dora", "-o", tmp_path / "d.safetensors",
                             "--to", "kohya")  # fmt: skip
    assert code == 0 and err == "" and "4 modules, max relative ΔW error 0\n" in out  # kohya holds DoRA
