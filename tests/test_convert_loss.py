"""`convert` compares the adapter's effect: a loss is refused and measured, DoRA survives into kohya."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loractl.adapter import Adapter, LoraModule
from loractl.errors import AdapterError
from loractl.formats import load_adapter, save_adapter
from loractl.formats.options import ReadOptions
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_header import read_header
from loractl.ops.convert import convert, plan_conversion
from tests.helpers import random_module, run_cli, tiny_base

DORA = "tiny-dora-magnitudes"


def _dense_dora(w: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """DoRA's merged weight from its definition, in float64: m ⊙ V / ‖V‖ per output row, V = W + s·B·A."""
    v = w.double() + m.scale * m.B.double() @ m.A.double()
    assert m.magnitude is not None
    return m.magnitude.double()[:, None] * v / v.norm(dim=1, keepdim=True)


def _dense_loss(fixtures_dir: Path) -> tuple[float, float]:
    """(share of the effect, relative change of the merged weights) when DoRA's magnitudes are dropped."""
    adapter = load_adapter(fixtures_dir / "adapters" / DORA)
    lost = effect = merged = 0.0
    with Checkpoint(fixtures_dir / "tiny-llama") as ckpt:
        for name, m in adapter.modules.items():
            w = ckpt.get(f"{name}.weight").double()
            dora, plain = _dense_dora(w, m), w + m.scale * m.B.double() @ m.A.double()
            lost += float((dora - plain).square().sum())
            effect += float((dora - w).square().sum())
            merged += float(dora.square().sum())
    return (lost / effect) ** 0.5, (lost / merged) ** 0.5


def test_the_fixture_magnitudes_change_the_output(fixtures_dir: Path) -> None:
    """Control: unlike tiny-dora (m = ‖W + ΔW‖), dropping this fixture's magnitudes changes W' a lot."""
    share, weights = _dense_loss(fixtures_dir)
    assert share > 0.3 and weights > 0.1


def test_lossy_conversion_is_refused_and_measured(fixtures_dir: Path, tmp_path: Path) -> None:
    src, out = fixtures_dir / "adapters" / DORA, tmp_path / "l.safetensors"
    with pytest.raises(AdapterError, match=r"DoRA magnitudes \(4 modules\): effect not measured, give --base") as e:
        convert(src, out, to="loralib")
    assert "--allow-loss" in (e.value.hint or "") and "kohya" in (e.value.hint or "")
    with pytest.raises(AdapterError, match=r"of the adapter's effect"):
        convert(src, out, to="loralib", read_options=ReadOptions(base=fixtures_dir / "tiny-llama"))
    assert list(tmp_path.iterdir()) == []
    report = convert(
        src, out, to="loralib", read_options=ReadOptions(base=fixtures_dir / "tiny-llama"), allow_loss=True
    )
    (loss,) = report.lost
    share, weights = _dense_loss(fixtures_dir)
    assert loss.update_change == pytest.approx(share, rel=1e-5)  # float32 merge vs float64 reference
    assert loss.weight_change == pytest.approx(weights, rel=1e-5)
    assert loss.count == 4 and len(loss.modules) == 4
    gguf = tmp_path / "l.gguf"  # a target that records lineage in the file
    convert(src, gguf, to="gguf", read_options=ReadOptions(base=fixtures_dir / "tiny-llama"), allow_loss=True)
    kept = load_adapter(gguf).lineage[-1]["metrics"]["lost"]
    assert kept[0]["what"] == "DoRA magnitudes" and kept[0]["update_change"] == pytest.approx(share, rel=1e-5)


def test_exact_folds_stay_silent(fixtures_dir: Path, tmp_path: Path) -> None:
    """tiny-dora's magnitudes equal ‖W + ΔW‖: dropping them is exact on its base, so nothing is lost."""
    src = fixtures_dir / "adapters" / "tiny-dora"
    report = convert(
        src, tmp_path / "l.safetensors", to="loralib", read_options=ReadOptions(base=fixtures_dir / "tiny-llama")
    )
    assert report.lost == () and any("DoRA magnitudes (4) dropped" in f for f in report.folded)
    code, out, err = run_cli("convert", src, "-o", tmp_path / "m.safetensors", "--to", "loralib",
                             "--base", fixtures_dir / "tiny-llama")  # fmt: skip
    assert code == 0 and err == "" and "LOSSY" not in out


def test_bias_and_embedding_losses_are_measured_without_a_base() -> None:
    lin = random_module(6, 5, 2, seed=1)
    biased = replace(random_module(6, 5, 2, seed=2), bias=torch.randn(6, generator=torch.Generator().manual_seed(3)))
    emb = replace(random_module(4, 9, 2, seed=4), kind="embedding")
    adapter = Adapter(modules={"a": lin, "b": biased, "e": emb})
    dense = {n: m.delta_weight(torch.float64) for n, m in adapter.modules.items()}
    assert biased.bias is not None
    bias_sq = float((biased.scale * biased.bias.double()).square().sum())
    total = sum(float(d.square().sum()) for d in dense.values()) + bias_sq
    plan = plan_conversion(adapter, "kohya")
    by_what = {x.what: x for x in plan.lost}
    assert by_what["lora_B biases"].update_change == pytest.approx((bias_sq / total) ** 0.5, rel=1e-9)
    emb_share = (float(dense["e"].square().sum()) / total) ** 0.5
    assert by_what["embedding LoRA modules"].update_change == pytest.approx(emb_share, rel=1e-9)
    assert by_what["embedding LoRA modules"].modules == ("e",) and by_what["lora_B biases"].weight_change is None


def test_full_tensor_loss_needs_and_uses_the_base(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", {"a.weight": (6, 5), "head.weight": (3, 6)})
    lin = random_module(6, 5, 2, seed=1)
    head = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    adapter = Adapter(modules={"a": lin}, full_tensors={"head.weight": head})
    (blind,) = plan_conversion(adapter, "kohya").lost
    assert blind.what == "full tensors" and blind.update_change is None
    (loss,) = plan_conversion(adapter, "kohya", base=base).lost
    with Checkpoint(base) as ckpt:
        w_head = ckpt.get("head.weight").double()
    lost_sq = float((head.double() - w_head).square().sum())
    total = lost_sq + float(lin.delta_weight(torch.float64).square().sum())
    assert loss.update_change == pytest.approx((lost_sq / total) ** 0.5, rel=1e-5)
    assert loss.weight_change == pytest.approx((lost_sq / float(head.double().square().sum())) ** 0.5, rel=1e-5)


def test_cli_refuses_then_allow_loss_reports(fixtures_dir: Path, tmp_path: Path) -> None:
    src, out = fixtures_dir / "adapters" / DORA, tmp_path / "l.safetensors"
    code, _, err = run_cli("convert", src, "-o", out, "--to", "loralib")
    assert code == 1 and err.startswith("error:") and "hint:" in err and not out.exists()
    code, stdout, err = run_cli("convert", src, "-o", out, "--to", "loralib", "--allow-loss", "--base",
                                fixtures_dir / "tiny-llama")  # fmt: skip
    assert code == 0 and "lost: DoRA magnitudes (4 modules): " in err and "LOSSY" in stdout
    code, stdout, _ = run_cli("convert", src, "-o", tmp_path / "j.safetensors", "--to", "loralib", "--allow-loss",
                              "--json")  # fmt: skip
    doc = json.loads(stdout)
    assert code == 0 and doc["lost"][0]["what"] == "DoRA magnitudes" and doc["lost"][0]["count"] == 4


def test_peft_dora_to_kohya_is_exact_and_lycoris_applies_it(fixtures_dir: Path, tmp_path: Path) -> None:
    """dora_scale (out, 1) as LyCORIS writes it; LyCORIS' own merge gives PEFT's DoRA weights."""
    from lycoris.modules.locon import LoConModule

    src = fixtures_dir / "adapters" / DORA
    report = convert(src, tmp_path / "k.safetensors", to="kohya")
    assert report.lost == () and report.verified
    header = read_header(tmp_path / "k.safetensors")
    scales = {k: v for k, v in header.tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == 4 and all(v.shape[1:] == (1,) for v in scales.values())
    assert json.loads(header.metadata["ss_network_args"])["dora_wd"] == "True"
    source, back = load_adapter(src), load_adapter(tmp_path / "k.safetensors")
    reference = _peft_merged(fixtures_dir)
    with (
        torch.no_grad(),  # LyCORIS loads state dicts without autograd
        Checkpoint(fixtures_dir / "tiny-llama") as ckpt,
        Checkpoint(tmp_path / "k.safetensors") as kohya,
    ):
        for name, m in source.modules.items():
            assert torch.equal(back.modules[name].magnitude, m.magnitude)  # type: ignore[arg-type]
            w = ckpt.get(f"{name}.weight")
            key = next(k for k in scales if k.endswith(name.replace(".", "_") + ".dora_scale"))
            prefix = key[: -len(".dora_scale")]
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data.copy_(w)
            lyco = LoConModule.make_module_from_state_dict(
                prefix, linear, kohya.get(f"{prefix}.lora_up.weight"), kohya.get(f"{prefix}.lora_down.weight"),
                None, kohya.get(f"{prefix}.alpha"), kohya.get(f"{prefix}.dora_scale"),
            )  # fmt: skip
            got = lyco.get_merged_weight()[0].double()
            dense = _dense_dora(w, m)
            tol = 1e-5 * float(dense.norm())  # float32 merges, relative to the merged weight's norm
            assert float((got - dense).norm()) <= tol, name
            assert float((reference[f"{name}.weight"].double() - dense).norm()) <= tol, name
            plain = w.double() + m.scale * m.B.double() @ m.A.double()
            assert float((got - plain).norm()) > 100 * tol  # control: without dora_scale LyCORIS would differ


def _peft_merged(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(fixtures_dir / "tiny-llama")
    merged = PeftModel.from_pretrained(model, fixtures_dir / "adapters" / DORA).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_kohya_dora_conv_file(tmp_path: Path) -> None:
    """A conv DoRA magnitude is held: written (out, 1, 1, 1) as LyCORIS does, read back as (out,)."""
    g = torch.Generator().manual_seed(5)
    conv = LoraModule(A=torch.randn(2, 3, 3, 3, generator=g), B=torch.randn(4, 2, 1, 1, generator=g), scale=0.5,
                      alpha=1.0, kind="conv", magnitude=torch.rand(4, generator=g) + 0.5)  # fmt: skip
    adapter = Adapter(modules={"unet.conv_in": conv})
    assert plan_conversion(adapter, "kohya").lost == ()
    path = save_adapter(adapter, tmp_path / "c.safetensors", format="kohya")
    shapes = {k: v.shape for k, v in read_header(path).tensors.items()}
    assert shapes["lora_unet_conv_in.dora_scale"] == (4, 1, 1, 1)
    back = load_adapter(path).modules["unet.conv_in"]
    assert back.magnitude is not None and torch.equal(back.magnitude, conv.magnitude)  # type: ignore[arg-type]
