"""diffusers files: the four key generations read, generation (d) written with its LoraConfig metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from loractl.adapter import Adapter, LoraModule
from loractl.errors import AdapterError
from loractl.formats import detect_format, load_adapter, save_adapter
from loractl.formats.diffusers import METADATA_KEY
from loractl.io.safetensors_header import read_header
from loractl.io.safetensors_writer import save_tensors
from tests.helpers import random_module

UNET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
PATHS = [f"{UNET}.to_q", f"{UNET}.to_out.0", "unet.conv_in", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
         "transformer.transformer_blocks.0.attn.to_k", "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"]  # fmt: skip


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    """Mixed ranks, per-module alphas, rsLoRA on all or none, DoRA on all or none, biases, conv."""
    names = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=5, unique=True))
    rslora, dora = draw(st.booleans()), draw(st.booleans())
    modules = {}
    for i, name in enumerate(names):
        rank, alpha = draw(st.integers(1, 5)), draw(st.sampled_from([1.0, 0.1, 1 / 3, 16.0, 7.7]))
        out, inp = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        m = random_module(out, inp, rank, alpha=alpha, seed=i)
        a, b, kind, g = m.A, m.B, "linear", torch.Generator().manual_seed(100 + i)
        if name.endswith("conv_in"):
            a, b, kind = torch.randn(rank, inp, 3, 3, generator=g), torch.randn(out, rank, 1, 1, generator=g), "conv"
        scale = alpha / rank**0.5 if rslora else alpha / rank
        modules[name] = LoraModule(
            A=a, B=b, scale=scale, alpha=alpha, scale_rule="alpha/sqrt(r)" if rslora else "alpha/r", kind=kind,
            magnitude=torch.rand(out, generator=g) + 0.5 if dora and kind == "linear" else None,
            bias=torch.randn(out, generator=g) if draw(st.booleans()) else None,
        )  # fmt: skip
    if dora and any(m.kind == "conv" for m in modules.values()):
        modules = {n: m for n, m in modules.items() if m.kind != "conv"} or {PATHS[0]: random_module(3, 3, 1)}
    return Adapter(modules=modules)


@given(adapters())
def test_round_trip_keeps_everything(tmp_path_factory: pytest.TempPathFactory, adapter: Adapter) -> None:
    path = tmp_path_factory.mktemp("d") / "pytorch_lora_weights.safetensors"
    save_adapter(adapter, path, format="diffusers")
    assert detect_format(path) == "diffusers" and detect_format(path.parent) == "diffusers"
    back = load_adapter(path)
    assert set(back.modules) == set(adapter.modules)
    for name, m in adapter.modules.items():
        got = back.modules[name]
        assert torch.equal(got.A, m.A) and torch.equal(got.B, m.B) and got.scale == m.scale and got.kind == m.kind
        for role in ("magnitude", "bias"):
            x, y = getattr(m, role), getattr(got, role)
            assert (x is None and y is None) or torch.equal(x, y)


def test_metadata_is_a_lora_config_per_component(tmp_path: Path) -> None:
    """diffusers builds `LoraConfig(**metadata)` per component; PEFT must resolve the same scales."""
    from peft import LoraConfig

    mods = {PATHS[0]: random_module(4, 4, 2, alpha=4.0), PATHS[1]: random_module(4, 4, 4, alpha=1.0, seed=1),
            PATHS[3]: random_module(4, 4, 2, alpha=2.0, seed=2)}  # fmt: skip
    path = save_adapter(Adapter(modules=mods), tmp_path / "w.safetensors", format="diffusers")
    flat = json.loads(read_header(path).metadata[METADATA_KEY])
    from loractl.formats.peft.config import module_alpha_rank

    for component in ("unet", "text_encoder"):
        fields = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(component + ".")}
        config = LoraConfig(**fields)  # accepted by PEFT as diffusers does
        for name, m in mods.items():
            if name.startswith(component + "."):
                rel = name[len(component) + 1 :]
                alpha = config.alpha_pattern.get(rel.replace(".", r"\."), config.lora_alpha)
                assert module_alpha_rank(fields, rel) == (alpha, m.rank)
                assert alpha / m.rank == m.scale


def _file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_tensors(path, tensors)
    return path


@pytest.mark.parametrize(
    ("down", "up", "module"),
    [
        (f"{UNET[5:]}.processor.to_q_lora.down.weight", f"{UNET[5:]}.processor.to_q_lora.up.weight", f"{UNET}.to_q"),
        (f"{UNET}.processor.to_out_lora.down.weight", f"{UNET}.processor.to_out_lora.up.weight", f"{UNET}.to_out.0"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
        (f"{UNET}.to_v.lora.down.weight", f"{UNET}.to_v.lora.up.weight", f"{UNET}.to_v"),
        (f"{UNET}.to_v.lora_A.weight", f"{UNET}.to_v.lora_B.weight", f"{UNET}.to_v"),
    ],
)  # fmt: skip
def test_each_generation_reads_with_unit_scale(tmp_path: Path, down: str, up: str, module: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    adapter = load_adapter(_file(tmp_path / "g.safetensors", {down: a, up: b}))
    m = adapter.modules[module]
    assert m.scale == 1.0 and torch.equal(m.A, a) and torch.equal(m.B, b)


def test_network_alphas_in_converted_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    path = _file(tmp_path / "n.safetensors", {f"{UNET}.to_q.lora.down.weight": a, f"{UNET}.to_q.lora.up.weight": b,
                                              f"{UNET}.to_q.alpha": torch.tensor(2.0)})  # fmt: skip
    assert load_adapter(path).modules[f"{UNET}.to_q"].scale == 0.5


def test_real_generation_c_file(real_adapters: Path) -> None:
    path = real_adapters / "diffusers-loradot-sd15-and-misconverted" / "2100-lora.safetensors"
    adapter = load_adapter(path)
    assert len(adapter.modules) == 128 and {m.rank for m in adapter.modules.values()} == {4}
    raw = load_file(str(path))
    name = "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"
    m = adapter.modules[name]
    assert m.scale == 1.0 and m.in_features == 320
    stem = "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.lora"
    assert torch.equal(m.delta_weight(), raw[f"{stem}.up.weight"] @ raw[f"{stem}.down.weight"])
    k = adapter.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert k.in_features == 768  # SD 1.x cross-attention width


def test_writer_refuses_models_without_a_pipeline_component(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="component"):
        save_adapter(
            Adapter(modules={"model.layers.0.q_proj": random_module(2, 2, 1)}), tmp_path / "x", format="diffusers"
        )
    assert not (tmp_path / "x").exists()
