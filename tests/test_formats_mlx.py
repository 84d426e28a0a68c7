"""mlx-lm adapters: transposed factors, absolute scale, folding on write, old .npz with --scale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from loractl.adapter import Adapter, LoraModule
from loractl.errors import FormatError, UsageError
from loractl.formats import detect_format, load_adapter, save_adapter
from loractl.formats.options import ReadOptions, WriteOptions
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.convert_verify import delta_error
from tests.helpers import random_module

MLX_REAL = "mlx-lm-qwen2.5-0.5b"
PATHS = [f"model.layers.{i}.{p}" for i in (2, 5) for p in ("self_attn.q_proj", "mlp.up_proj")] + ["model.embed_tokens"]


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    """Mixed ranks and scales (the writer must pad and fold), DoRA on all or none, embeddings."""
    names = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=5, unique=True))
    dora = draw(st.booleans())
    modules = {}
    for i, name in enumerate(names):
        m = random_module(draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 5)),
                          alpha=draw(st.sampled_from([1.0, 16.0, 0.3, 7.0])), seed=i)  # fmt: skip
        kind = "embedding" if name.endswith("embed_tokens") else "linear"
        magnitude = torch.rand(m.out_features, generator=torch.Generator().manual_seed(100 + i)) + 0.5 if dora else None
        modules[name] = LoraModule(A=m.A, B=m.B, scale=m.scale, alpha=m.alpha, kind=kind, magnitude=magnitude)
    return Adapter(modules=modules)


@given(adapters())
def test_round_trip_keeps_delta_weight(tmp_path_factory: pytest.TempPathFactory, adapter: Adapter) -> None:
    out = tmp_path_factory.mktemp("m") / "adapters"
    save_adapter(adapter, out, format="mlx")
    assert detect_format(out) == "mlx"
    back = load_adapter(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == max(m.rank for m in adapter.modules.values())
    assert len({m.rank for m in back.modules.values()}) == 1 and len({m.scale for m in back.modules.values()}) == 1
    for name, m in adapter.modules.items():
        got = back.modules[name]
        assert delta_error(m, got) <= 1e-6 and got.kind == m.kind
        assert (m.magnitude is None and got.magnitude is None) or torch.equal(m.magnitude, got.magnitude)
    if len({m.scale for m in adapter.modules.values()}) == 1 and len({m.rank for m in adapter.modules.values()}) == 1:
        assert all(torch.equal(back.modules[n].B, m.B) for n, m in adapter.modules.items())  # nothing to fold


def test_real_file_scale_transpose_and_dead_alpha(real_adapters: Path) -> None:
    path = real_adapters / MLX_REAL
    adapter = load_adapter(path)
    raw = load_file(str(path / "adapters.safetensors"))
    assert len(adapter.modules) == 8 and {m.scale for m in adapter.modules.values()} == {10.0}
    for name, m in adapter.modules.items():
        assert torch.equal(m.A, raw[f"{name}.lora_a"].T) and torch.equal(m.B, raw[f"{name}.lora_b"].T)
        reference = 10.0 * raw[f"{name}.lora_b"].T.double() @ raw[f"{name}.lora_a"].T.double()  # mlx's fuse formula
        assert (m.delta_weight(torch.float64) - reference).norm() <= 1e-12 * reference.norm()
    assert adapter.modules["model.layers.20.self_attn.v_proj"].out_features == 128
    assert any("alpha (16) is ignored" in w for w in adapter.warnings)


def test_writer_keeps_the_source_config_and_num_layers_from_base(tmp_path: Path, real_adapters: Path) -> None:
    adapter = load_adapter(real_adapters / MLX_REAL)
    out = save_adapter(adapter, tmp_path / "same", format="mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 4 and config["lora_parameters"]["scale"] == 10.0
    assert "alpha" not in config["lora_parameters"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    stripped = Adapter(modules=adapter.modules)
    out = save_adapter(stripped, tmp_path / "based", format="mlx", options=WriteOptions(base=base))
    assert json.loads((out / "adapter_config.json").read_text())["num_layers"] == 30 - 20


def test_mlx_to_peft_matches_the_verified_numbers(tmp_path: Path, real_adapters: Path) -> None:
    """README: PEFT lora_alpha = 80, and PEFT's get_delta_weight equals 10 · lora_bᵀ @ lora_aᵀ."""
    from peft import PeftModel

    from loractl.ops.convert import convert

    convert(real_adapters / MLX_REAL, tmp_path / "peft", to="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["alpha_pattern"]) == (8, 80, {})
    raw = load_file(str(real_adapters / MLX_REAL / "adapters.safetensors"))

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(896, 896), torch.nn.Linear(896, 128)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class Body(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity()] * 20 + [Layer() for _ in range(4)])

    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Body()

    model = PeftModel.from_pretrained(Root(), str(tmp_path / "peft"))
    for i in range(20, 24):
        for proj in ("q_proj", "v_proj"):
            layer = getattr(model.base_model.model.model.layers[i].self_attn, proj)
            name = f"model.layers.{i}.self_attn.{proj}"
            expected = 10.0 * raw[f"{name}.lora_b"].T @ raw[f"{name}.lora_a"].T
            assert (layer.get_delta_weight("default") - expected).norm() <= 1e-6 * expected.norm()


def test_npz_needs_scale(tmp_path: Path) -> None:
    a, b = np.random.default_rng(0).standard_normal((8, 2), dtype=np.float32), np.ones((2, 6), np.float32)
    path = tmp_path / "adapters.npz"
    np.savez(path, **{"layers.0.attention.wq.lora_a": a, "layers.0.attention.wq.lora_b": b})
    assert detect_format(path) == "mlx"
    with pytest.raises(UsageError, match="stores no scale") as e:
        load_adapter(path)
    assert e.value.hint and "--scale" in e.value.hint
    m = load_adapter(path, options=ReadOptions(scale=20.0)).modules["layers.0.attention.wq"]
    assert m.scale == 20.0 and torch.equal(m.A, torch.from_numpy(a).T) and torch.equal(m.B, torch.from_numpy(b).T)


def test_contradicting_scale_and_switch_linear_are_refused(tmp_path: Path, real_adapters: Path) -> None:
    with pytest.raises(UsageError, match="contradicts"):
        load_adapter(real_adapters / MLX_REAL, options=ReadOptions(scale=20.0))
    moe = tmp_path / "moe"
    shutil.copytree(real_adapters / MLX_REAL, moe)
    save_tensors(moe / "adapters.safetensors", {"model.layers.0.mlp.switch_mlp.gate_proj.lora_a": torch.ones(4, 2, 8),
                                                "model.layers.0.mlp.switch_mlp.gate_proj.lora_b": torch.ones(4, 6, 2)})  # fmt: skip
    with pytest.raises(FormatError, match="SwitchLinear"):
        load_adapter(moe)
