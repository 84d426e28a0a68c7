"""Checkpoints saved by transformers with bitsandbytes weights as merge (and extract) bases (issue 24 item 3).

The bases are made the way the `*-bnb-4bit` Hub repos were: the tiny Llama loaded with a
`BitsAndBytesConfig` on the CPU and `save_pretrained`. The judge is PEFT's `merge_and_unload` on the
same quantized model dequantized by transformers, and transformers loading what `--keep-quant` wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import raw, run_cli, tensors
from oracles import oracle

from loractl.io.checkpoint import Checkpoint

bnb = oracle("bitsandbytes", "bitsandbytes", "qlora")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY, ADAPTER = FIXTURES / "tiny-llama", FIXTURES / "adapters" / "tiny-qv"
QUANT = {  # BitsAndBytesConfig arguments, one per serialization
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}  # fmt: skip


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, kw in QUANT.items():
        config = transformers.BitsAndBytesConfig(**kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY, quantization_config=config, device_map="cpu")
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
        shutil.copy(TINY / "tokenizer.json", out[name])
    return out


def dequantized_model(path: Path) -> Any:
    """transformers' own dequantization of the saved model, in float32 (PEFT's base)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    return model.dequantize().float()


def peft_merged(path: Path) -> dict[str, torch.Tensor]:
    merged = peft.PeftModel.from_pretrained(dequantized_model(path), ADAPTER).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(torch.tensor([[1, 5, 9, 33, 70, 2, 101, 17]])).logits.float()
    return out


@pytest.mark.parametrize("kind", list(QUANT))
def test_merge_equals_peft_on_the_dequantized_base(kind: str, quantized: dict[str, Path], tmp_path: Path) -> None:
    base = quantized[kind]
    code, out, err = run_cli("merge", base, ADAPTER, "-o", tmp_path / "f32", "--dtype", "float32", "--json")
    assert code == 0, err
    theirs = peft_merged(base)
    ours = tensors(tmp_path / "f32")
    assert set(ours) == set(theirs)
    for name, value in ours.items():  # bit for bit in float32, every tensor
        assert torch.equal(value, theirs[name].float()), name
    assert "quantization_config" not in json.loads((tmp_path / "f32" / "config.json").read_text())
    assert json.loads(out)["layout"].startswith("bitsandbytes")

    code, out, err = run_cli("merge", base, ADAPTER, "-o", tmp_path / "default", "--json")
    assert code == 0, err
    compute = {"nf4-double": torch.bfloat16}.get(kind, torch.float32)  # the compute dtype, else the config's dtype
    with Checkpoint(base) as ckpt:
        quantized_names = {n for n in ours if ckpt.info(n).dtype in ("U8", "I8")}
    default, base_raw, out_raw = tensors(tmp_path / "default"), raw(base), raw(tmp_path / "default")
    for name in ours:
        if name in quantized_names:
            assert torch.equal(default[name], theirs[name].to(compute)), name  # the float32 merge, cast once
        else:
            assert out_raw[name] == base_raw[name] or name.endswith(("q_proj.weight", "v_proj.weight")), name
    losses = [m["rounding_loss"] for m in json.loads(out)["modules"]]
    assert len(losses) == 4 and all((x > 0) == (compute == torch.bfloat16) for x in losses)
    report = json.loads((tmp_path / "default" / "loractl_merge.json").read_text())
    assert report["adapters"][0]["base_fingerprint"] is None  # quantized weights: nothing to fingerprint
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "default")  # a plain checkpoint now
    assert torch.allclose(logits(model), logits(peft.PeftModel.from_pretrained(dequantized_model(base), ADAPTER)),
                          atol=0.05 if compute == torch.bfloat16 else 1e-4)  # fmt: skip


def requantized(kind: str, merged: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """bitsandbytes' own quantizer on the float merge, with the base's settings, dequantized again."""
    F = bnb.functional
    if kind == "int8":
        codes, scb, _ = F.int8_vectorwise_quant(merged.half())
        return F.int8_vectorwise_dequant(codes, scb).float()
    packed, qs = F.quantize_4bit(merged.to(getattr(torch, state["dtype"])), blocksize=state["blocksize"],
                                 compress_statistics="nested_offset" in state, quant_type=state["quant_type"])  # fmt: skip
    return F.dequantize_4bit(packed, qs).float()


@pytest.mark.parametrize("kind", list(QUANT))
def test_keep_quant_is_loaded_by_transformers(kind: str, quantized: dict[str, Path], tmp_path: Path) -> None:
    base, out = quantized[kind], tmp_path / "kept"
    code, stdout, err = run_cli("merge", base, ADAPTER, "-o", out, "--keep-quant", "--json")
    assert code == 0, err
    config = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert config(out) == config(base)
    assert not list(out.glob(".*")), "the spill file is removed before the output is renamed"
    base_raw, out_raw = raw(base), raw(out)
    touched = ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj",
               "layers.1.self_attn.v_proj")  # fmt: skip
    assert set(out_raw) == set(base_raw)
    for name in base_raw:  # every stored tensor of an untouched weight, byte for byte
        assert (out_raw[name] == base_raw[name]) or any(t in name for t in touched), name

    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    theirs = peft_merged(base)
    ours = {k: v.detach() for k, v in dequantized_model(out).state_dict().items()}
    losses = {}
    for name in (f"model.{t}.weight" for t in touched):
        state = None if kind == "int8" else json.loads(out_raw[f"{name}.quant_state.bitsandbytes__{kind[:3]}"])
        assert torch.equal(ours[name], requantized(kind, theirs[name], state or {})), name
        start = dequantized_model(base).state_dict()[name].double()
        delta = theirs[name].double() - start
        carried = float(((ours[name].double() - start) * delta).sum() / delta.square().sum())
        losses[name.removesuffix(".weight")] = 1 - min(1.0, max(0.0, carried))
    report = json.loads(stdout)
    for m in report["modules"]:  # the report's rounding loss, against a dense float64 reference
        assert m["stored_type"] == ("INT8" if kind == "int8" else kind[:3].upper())
        assert m["rounding_loss"] == pytest.approx(losses[m["module"]], abs=1e-6)
    # the merged 4-bit model is nearer the float merge than the 4-bit base is: the update survives
    float_merge = logits(peft.PeftModel.from_pretrained(dequantized_model(base), ADAPTER).merge_and_unload())
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    assert (logits(model) - float_merge).abs().max() < 0.5 * (logits(base_model) - float_merge).abs().max()


def test_extract_reads_a_bnb_checkpoint_on_either_side(quantized: dict[str, Path], tmp_path: Path) -> None:
    base = quantized["nf4-double"]
    code, _, err = run_cli("merge", base, ADAPTER, "-o", tmp_path / "merged", "--dtype", "float32")
    assert code == 0, err
    code, _, err = run_cli("extract", base, tmp_path / "merged", "-o", tmp_path / "lora", "--rank", "8",
                           "--targets", "q_proj", "--targets", "v_proj")  # fmt: skip
    assert code == 0, err
    from loractl.formats import load_adapter

    theirs, ours = load_adapter(ADAPTER), load_adapter(tmp_path / "lora")
    for name, m in theirs.modules.items():
        expected = m.delta_weight()
        assert (ours.modules[name].delta_weight() - expected).norm() < 1e-4 * expected.norm(), name
    code, _, err = run_cli("extract", tmp_path / "merged", base, "-o", tmp_path / "back", "--rank", "8",
                           "--targets", "q_proj", "--targets", "v_proj")  # fmt: skip
    assert code == 0, err
    back = load_adapter(tmp_path / "back")
    for name, m in theirs.modules.items():
        expected = -m.delta_weight()
        assert (back.modules[name].delta_weight() - expected).norm() < 1e-4 * expected.norm(), name


def test_keep_quant_and_dtype_together_is_a_usage_error(quantized: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run_cli("merge", quantized["fp4"], ADAPTER, "-o", tmp_path / "o", "--keep-quant", "--dtype", "bf16")
    assert code == 2 and "error: --keep-quant keeps" in err and "hint:" in err
    assert not (tmp_path / "o").exists()


def test_a_damaged_quant_state_is_named(quantized: dict[str, Path], tmp_path: Path) -> None:
    from loractl.io.safetensors_writer import save_tensors

    damaged = tmp_path / "damaged"
    shutil.copytree(quantized["nf4-double"], damaged)
    values = tensors(damaged)
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(values[key].numpy())) | {"blocksize": 3}  # bitsandbytes would read out of bounds
    values[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_tensors(damaged / "model.safetensors", values, {"format": "pt"})
    code, _, err = run_cli("merge", damaged, ADAPTER, "-o", tmp_path / "o")
    assert code != 0 and f"error: {damaged}" in err and "not a bitsandbytes 4-bit state" in err and "hint:" in err
    assert not (tmp_path / "o").exists()


def test_the_api_and_the_report_say_what_was_converted(quantized: dict[str, Path], tmp_path: Path) -> None:
    import loractl

    kept = loractl.merge(quantized["fp4"], [ADAPTER], tmp_path / "kept", keep_quant=True)
    assert kept.plan.kind == "bitsandbytes fp4" and kept.plan.tensors_converted == 0 and kept.tensors_copied == 17
    code, out, err = run_cli("merge", quantized["fp4"], ADAPTER, "-o", tmp_path / "plain")
    assert code == 0, err
    # 14 quantized projections: 4 merged, the other 10 dequantized; embeddings, norms and head copied
    assert "bitsandbytes fp4, written as float32: 4 of 21 tensors merged, 10 converted" in out
    assert "4 tensors checked: no NaN/Inf, 10 converted, 7 copied byte for byte" in out  # the one merge renderer


def test_validate_reads_the_shapes_the_quantized_weights_stand_for(quantized: dict[str, Path], tmp_path: Path) -> None:
    from helpers import qv_adapter, save

    for kind in ("nf4-double", "int8"):  # packed (n/2, 1) codes, int8 rows: both are (64, 64) weights
        code, out, err = run_cli("validate", ADAPTER, "--base", quantized[kind])
        assert code == 0 and "ok" in out, out + err
    wrong = save(qv_adapter(layers=2, hidden=16), tmp_path / "wrong")
    code, out, _ = run_cli("validate", wrong, "--base", quantized["nf4-double"])
    assert code != 0 and "base-shape" in out and "[64, 64]" in out
