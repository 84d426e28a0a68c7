"""FP8 checkpoints with block scales (DeepSeek-V3's layout) as merge bases (issue 24 item 4).

The bases are written here by an independent per-block quantizer (a loop over 128 × 128 blocks,
amax / 448), and every check dequantizes with the dense reference W = codes.float() · scale_inv of
the element's block; transformers' own FP8 loader (which on a CPU dequantizes to bf16) is the consumer.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_module, raw, run_cli, save, tensors

from loractl.adapter import Adapter, AdapterMeta

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 128
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_quantize(w: torch.Tensor, top: float = 448.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's per-block rule, one block at a time: scale_inv = amax/448, codes = w·(448/amax)
    (`top` other than 448: a publisher that left headroom)."""
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(-(-rows // BLOCK), -(-cols // BLOCK))
    for i in range(0, rows, BLOCK):
        for j in range(0, cols, BLOCK):
            b = w[i : i + BLOCK, j : j + BLOCK].float()
            amax = b.abs().max().clamp(min=1e-4)
            codes[i : i + BLOCK, j : j + BLOCK] = (b * (top / amax)).clamp(-448, 448).to(torch.float8_e4m3fn)
            scales[i // BLOCK, j // BLOCK] = amax / top
    return codes, scales


def block_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out = codes.float()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] *= scales[i, j]
    return out


def fp8_checkpoint(path: Path, intermediate: int) -> Path:
    """A one-layer Llama in bf16 with its projections in FP8 blocks, and the config DeepSeek publishes."""
    from loractl.io.safetensors_writer import save_tensors

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=intermediate,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      tie_word_embeddings=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    stored = {}
    for name, value in model.state_dict().items():
        if name.endswith(tuple(f"{p}.weight" for p in PROJ)):
            # q_proj with headroom: a block the merge leaves alone must keep it (448 would give the same bytes back)
            stored[name], stored[name + "_scale_inv"] = block_quantize(value, 400.0 if "q_proj" in name else 448.0)
        else:
            stored[name] = value.contiguous()
    path.mkdir()
    save_tensors(path / "model.safetensors", stored, {"format": "pt"})
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK, BLOCK]}  # fmt: skip
    config.save_pretrained(path)
    return path


def adapter(intermediate: int) -> Adapter:
    """q_proj (its first 128 rows untouched), v_proj and down_proj (its last column block partial when
    `intermediate` is), ΔW about a tenth of W."""
    small = lambda m: replace(m, B=m.B * 1e-3)  # noqa: E731
    q = small(random_module(256, 256, 4, seed=1))
    b = q.B.clone()
    b[:BLOCK] = 0
    modules = {
        "model.layers.0.self_attn.q_proj": replace(q, B=b),
        "model.layers.0.self_attn.v_proj": small(random_module(128, 256, 4, seed=2)),
        "model.layers.0.mlp.down_proj": small(random_module(256, intermediate, 4, seed=3)),
    }
    return Adapter(modules=modules, meta=AdapterMeta(base_model="tiny-fp8"))


@pytest.fixture(scope="module", params=[384, 320], ids=["whole-blocks", "partial-blocks"])
def case(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    base = fp8_checkpoint(root / "base", request.param)
    return base, save(adapter(request.param), root / "lora"), request.param


def dense_merge(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """W + ΔW in float64 from the reference dequantization, for the adapted weights."""
    from loractl.formats import load_adapter

    stored, modules = tensors(base), load_adapter(lora).modules
    return {f"{m}.weight": block_dequantize(stored[f"{m}.weight"], stored[f"{m}.weight_scale_inv"]).double()
            + mod.delta_weight().double() for m, mod in modules.items()}  # fmt: skip


def test_merge_keeps_fp8_and_recomputes_touched_blocks(case: tuple[Path, Path, int], tmp_path: Path) -> None:
    base, lora, _ = case
    code, out, err = run_cli("merge", base, lora, "-o", tmp_path / "f32", "--dtype", "float32")
    assert code == 0, err
    exact = tensors(tmp_path / "f32")  # the float32 merge, dequantized: what the FP8 output quantizes
    for name, reference in dense_merge(base, lora).items():
        assert torch.allclose(exact[name].double(), reference, rtol=0, atol=1e-6 * reference.abs().max()), name
    assert "quantization_config" not in json.loads((tmp_path / "f32" / "config.json").read_text())

    code, out, err = run_cli("merge", base, lora, "-o", tmp_path / "fp8", "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "fp8" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert not list((tmp_path / "fp8").glob(".*")), "the spill file is removed before the output is renamed"
    ours, before, ours_raw, base_raw = tensors(tmp_path / "fp8"), tensors(base), raw(tmp_path / "fp8"), raw(base)
    merged = {f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    for name in base_raw:
        if name.removesuffix("_scale_inv") not in merged:
            assert ours_raw[name] == base_raw[name], name  # untouched tensors: byte for byte
    for name in merged:
        codes, scales = block_quantize(exact[name])
        if "q_proj" in name:  # its first row of blocks gets no update: codes and scale as they were
            codes[:BLOCK] = before[name][:BLOCK]
            scales[0] = before[name + "_scale_inv"][0]
        assert torch.equal(ours[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(ours[name + "_scale_inv"], scales), name
    report = json.loads(out)
    for m in report["modules"]:
        name = m["module"] + ".weight"
        start = block_dequantize(before[name], before[name + "_scale_inv"]).double()
        delta = exact[name].double() - start
        carried = ((block_dequantize(ours[name], ours[name + "_scale_inv"]).double() - start) * delta).sum()
        assert m["stored_type"] == "F8_E4M3"
        assert m["rounding_loss"] == pytest.approx(1 - min(1.0, float(carried / delta.square().sum())), abs=1e-6)


def test_dtype_bfloat16_writes_a_plain_checkpoint(case: tuple[Path, Path, int], tmp_path: Path) -> None:
    base, lora, _ = case
    code, _, err = run_cli("merge", base, lora, "-o", tmp_path / "f32", "--dtype", "float32")
    assert code == 0, err
    code, _, err = run_cli("merge", base, lora, "-o", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    exact, ours = tensors(tmp_path / "f32"), tensors(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in ours.values()) and set(ours) == {n for n in exact}
    for name, value in ours.items():
        assert torch.equal(value, exact[name].to(torch.bfloat16)), name  # one rounding, of the float32 merge
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", "bfloat16") == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.detach(), ours["model.layers.0.mlp.down_proj.weight"])


def test_transformers_loads_the_merged_fp8(case: tuple[Path, Path, int], tmp_path: Path) -> None:
    """transformers 5 on a CPU dequantizes FP8 to bf16 as it loads; it refuses a shape that is not whole blocks."""
    base, lora, intermediate = case
    if intermediate % BLOCK:
        pytest.skip("transformers' FP8 dequantizer needs whole blocks (the partial case is checked by reference)")
    code, _, err = run_cli("merge", base, lora, "-o", tmp_path / "fp8")
    assert code == 0, err
    ours = tensors(tmp_path / "fp8")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", device_map="cpu")
    for name, value in model.state_dict().items():
        expected = (block_dequantize(ours[name], ours[name + "_scale_inv"]) if name + "_scale_inv" in ours
                    else ours[name].float())  # fmt: skip
        assert torch.equal(value, expected.to(value.dtype)), name


def test_extract_reads_fp8_on_either_side(case: tuple[Path, Path, int], tmp_path: Path) -> None:
    from loractl.formats import load_adapter

    base, lora, _ = case
    code, _, err = run_cli("merge", base, lora, "-o", tmp_path / "f32", "--dtype", "float32")
    assert code == 0, err
    code, _, err = run_cli("extract", base, tmp_path / "f32", "-o", tmp_path / "lora", "--rank", "4",
                           "--targets", "q_proj", "--targets", "v_proj", "--targets", "down_proj")  # fmt: skip
    assert code == 0, err
    theirs, ours = load_adapter(lora), load_adapter(tmp_path / "lora")
    for name, m in theirs.modules.items():
        expected = m.delta_weight()
        assert (ours.modules[name].delta_weight() - expected).norm() < 1e-4 * expected.norm(), name


def test_unsupported_fp8_layouts_are_refused(case: tuple[Path, Path, int], tmp_path: Path) -> None:
    import shutil

    base, lora, _ = case
    other = tmp_path / "per-tensor"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("merge", other, lora, "-o", tmp_path / "o")
    assert code != 0 and "weight_block_size" in err and "hint:" in err and not (tmp_path / "o").exists()
    code, _, err = run_cli("merge", base, lora, "-o", tmp_path / "o", "--keep-quant", "--dtype", "float16")
    assert code == 2 and "--keep-quant" in err
