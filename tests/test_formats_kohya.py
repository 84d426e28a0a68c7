"""kohya / LyCORIS LoCon files: round trips, name resolution, alpha rules, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loractl.adapter import Adapter, LoraModule
from loractl.errors import AdapterError, FormatError, UsageError
from loractl.formats import detect_format, load_adapter, save_adapter
from loractl.formats.kohya import NAMES_KEY
from loractl.formats.kohya.names import resolve
from loractl.formats.options import ReadOptions
from loractl.io.safetensors_header import read_header
from loractl.io.safetensors_writer import save_tensors
from tests.helpers import random_module, tiny_base

PATHS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
    "unet.down_blocks.0.resnets.0.conv1",
    "text_encoder.text_model.encoder.layers.3.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "odd_name.with_under.scores",  # resolvable only through loractl's name map or --base
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    """Mixed ranks, per-module alphas (awkward ones too), rsLoRA scales, conv kernels, one dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    names = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=5, unique=True))
    modules = {}
    for i, name in enumerate(names):
        rank, alpha = draw(st.integers(1, 6)), draw(st.sampled_from([1.0, 0.1, 1 / 3, 16.0, 7.7, 2.5e5]))
        m = random_module(draw(st.integers(1, 7)), draw(st.integers(1, 7)), rank, alpha=alpha, dtype=dtype, seed=i)
        if name.endswith("conv1"):
            kernel = draw(st.sampled_from([(1, 1), (3, 3)]))
            m = LoraModule(A=m.A[..., None, None].expand(*m.A.shape, *kernel).contiguous(), B=m.B[..., None, None],
                           scale=m.scale, alpha=alpha, kind="conv")  # fmt: skip
        if draw(st.booleans()):
            m = LoraModule(A=m.A, B=m.B, scale=alpha / rank**0.5, alpha=alpha, scale_rule="alpha/sqrt(r)", kind=m.kind)
        modules[name] = m
    return Adapter(modules=modules)


@given(adapters())
def test_round_trip_keeps_factors_and_scales_exactly(
    tmp_path_factory: pytest.TempPathFactory, adapter: Adapter
) -> None:
    path = tmp_path_factory.mktemp("k") / "a.safetensors"
    save_adapter(adapter, path, format="kohya")
    assert detect_format(path) == "kohya"
    back = load_adapter(path)
    assert set(back.modules) == set(adapter.modules)
    for name, m in adapter.modules.items():
        got = back.modules[name]
        assert torch.equal(got.A, m.A) and torch.equal(got.B, m.B) and got.kind == m.kind
        assert got.scale == m.scale  # float32 alphas that round are recovered from loractl's record
    assert back.content_hash() == adapter.content_hash()


def test_written_keys_alpha_and_metadata(tmp_path: Path) -> None:
    mods = {PATHS[0]: random_module(8, 6, 4, alpha=8.0), PATHS[3]: random_module(8, 6, 2, alpha=1.0)}
    path = save_adapter(Adapter(modules=mods), tmp_path / "a.safetensors", format="kohya")
    header = read_header(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(header.tensors)
    assert header.tensors[f"{name}.alpha"].shape == () and header.tensors[f"{name}.alpha"].dtype == "F32"
    assert "lora_te_text_model_encoder_layers_3_self_attn_q_proj.alpha" in header.tensors
    md = header.metadata
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"
    from loractl.io.checkpoint import Checkpoint

    with Checkpoint(path) as ckpt:
        assert ckpt.get(f"{name}.alpha").item() == 8.0


def test_second_text_encoder_switches_to_sdxl_prefixes(tmp_path: Path) -> None:
    mods = {"text_encoder.text_model.encoder.layers.0.mlp.fc1": random_module(4, 4, 2),
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": random_module(4, 4, 2, seed=1)}  # fmt: skip
    path = save_adapter(Adapter(modules=mods), tmp_path / "a.safetensors", format="kohya")
    assert {k.split(".")[0] for k in read_header(path).tensors} == {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    }
    assert set(load_adapter(path).modules) == set(mods)


def _kohya_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_tensors(path, tensors, metadata)
    return path


def test_foreign_file_alpha_rules(tmp_path: Path) -> None:
    """Missing alpha → scale 1; alpha 0 → scale 1 with a warning; bf16/int64 alphas read as numbers."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    path = _kohya_file(tmp_path / "f.safetensors", {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": a,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": b,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(0.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": a,
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": b,
        "lora_te_text_model_encoder_layers_0_mlp_fc2.alpha": torch.tensor(0.1, dtype=torch.bfloat16),
        "lora_te_text_model_encoder_layers_0_mlp_out.lora_down.weight": a,
        "lora_te_text_model_encoder_layers_0_mlp_out.lora_up.weight": b,
        "lora_te_text_model_encoder_layers_0_mlp_out.alpha": torch.tensor(4, dtype=torch.int64),
    })  # fmt: skip
    with pytest.raises(UsageError, match=r"mlp_out.*unknown segment"):
        load_adapter(path)  # 'out' is not a known segment: needs --base
    base = tiny_base(tmp_path / "base", {
        "unet.mid_block.attentions.0.proj_in.weight": (6, 8),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": (6, 8),
        "text_encoder.text_model.encoder.layers.0.mlp.fc2.weight": (6, 8),
        "text_encoder.text_model.encoder.layers.0.mlp_out.weight": (6, 8),
    })  # fmt: skip
    adapter = load_adapter(path, options=ReadOptions(base=base))
    scales = {k.rsplit(".", 1)[-1]: m.scale for k, m in adapter.modules.items()}
    assert scales == {"proj_in": 1.0, "fc1": 1.0, "fc2": 0.10009765625 / 4, "mlp_out": 1.0}
    assert any("alpha is 0" in w for w in adapter.warnings)


def test_names_resolve_by_vocabulary_by_base_and_refuse_ties(tmp_path: Path) -> None:
    names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lycoris_model_layers_3_mlp_gate_proj"]  # fmt: skip
    assert resolve(names, base=None, recorded={}) == {
        names[0]: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        names[1]: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        names[2]: "model.layers.3.mlp.gate_proj",
    }
    with pytest.raises(UsageError, match="reads as") as e:
        resolve(["lycoris_model_conv_out_proj"], base=None, recorded={})  # conv.out_proj or conv_out.proj
    assert e.value.hint and "--base" in e.value.hint
    base = tiny_base(tmp_path / "b", {"a_b.c.weight": (2, 2), "a.b_c.weight": (2, 2), "x.y_z.weight": (2, 2)})
    assert resolve(["lycoris_x_y_z"], base=base, recorded={}) == {"lycoris_x_y_z": "x.y_z"}
    with pytest.raises(UsageError, match="several weights"):
        resolve(["lycoris_a_b_c"], base=base, recorded={})
    with pytest.raises(UsageError, match="matches no weight"):
        resolve(["lycoris_q_r"], base=base, recorded={})


def test_loractl_files_need_no_base_and_foreign_ones_do(tmp_path: Path) -> None:
    adapter = Adapter(modules={"odd_name.with_under.scores": random_module(4, 4, 2)})
    path = save_adapter(adapter, tmp_path / "a.safetensors", format="kohya")
    assert set(load_adapter(path).modules) == {"odd_name.with_under.scores"}
    header = read_header(path)
    stripped = {k: v for k, v in header.metadata.items() if k not in (NAMES_KEY, "loractl")}
    from loractl.io.checkpoint import Checkpoint

    with Checkpoint(path) as ckpt:
        tensors = {k: ckpt.get(k) for k in ckpt.names}
    foreign = _kohya_file(tmp_path / "foreign.safetensors", tensors, stripped)
    with pytest.raises(UsageError):
        load_adapter(foreign)
    base = tiny_base(tmp_path / "base", {"odd_name.with_under.scores.weight": (4, 4)})
    assert set(load_adapter(foreign, options=ReadOptions(base=base)).modules) == {"odd_name.with_under.scores"}


@pytest.mark.parametrize(
    ("leaf", "algo"),
    [("oft_blocks", "OFT"), ("a1.weight", "GLoRA"), ("lora_mid.weight", "Tucker")],
)
def test_lycoris_algorithms_are_refused_with_a_way_out(tmp_path: Path, leaf: str, algo: str) -> None:
    path = _kohya_file(
        tmp_path / "l.safetensors", {f"lora_unet_mid_block_attentions_0_proj_in.{leaf}": torch.ones(2, 2)}
    )
    assert detect_format(path) == "kohya"
    with pytest.raises(FormatError, match=algo) as e:
        load_adapter(path)
    assert e.value.hint and "merge" in e.value.hint and "extract" in e.value.hint


@pytest.mark.parametrize(("leaf", "missing"), [("hada_w1_a", "hada_w1_b"), ("lokr_w1", "lokr_w2")])
def test_incomplete_loha_lokr_is_refused_naming_the_missing_tensor(tmp_path: Path, leaf: str, missing: str) -> None:
    """LoHa/LoKr are read (tests/test_interop_lycoris.py); one missing its other factors is a structural error."""
    path = _kohya_file(
        tmp_path / "l.safetensors", {f"lora_unet_mid_block_attentions_0_proj_in.{leaf}": torch.ones(2, 2)}
    )
    with pytest.raises(AdapterError, match=missing) as e:
        load_adapter(path)
    assert e.value.hint and "validate" in e.value.hint


def test_locon_conv_reads_as_lora_and_in_axis_dora_is_refused(tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    path = _kohya_file(tmp_path / "c.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                                    f"{name}.alpha": torch.tensor(2.0)})  # fmt: skip
    m = load_adapter(path).modules["unet.down_blocks.0.resnets.0.conv1"]
    assert m.kind == "conv" and m.scale == 0.5
    dense = (up.flatten(1) @ down.flatten(1)).reshape(5, 3, 3, 3) * 0.5  # independent reference
    assert torch.allclose(m.delta_weight(), dense)
    bad = _kohya_file(tmp_path / "d.safetensors", {f"{name}.lora_down.weight": down[..., 0, 0],
                                                   f"{name}.lora_up.weight": up[..., 0, 0],
                                                   f"{name}.dora_scale": torch.ones(1, 3)})  # fmt: skip
    with pytest.raises(Exception, match="per input column"):
        load_adapter(bad)


def test_misconverted_real_file_is_refused_naming_the_suffix(real_adapters: Path) -> None:
    path = real_adapters / "diffusers-loradot-sd15-and-misconverted" / "new.safetensors"
    assert detect_format(path) == "kohya"
    with pytest.raises(FormatError, match=r"malformed suffix '_lora_(down|up)\.weight'"):
        load_adapter(path)


def test_written_names_map_is_json_of_all_modules(tmp_path: Path) -> None:
    mods = {p: random_module(3, 3, 1, seed=i) for i, p in enumerate(PATHS[:2])}
    path = save_adapter(Adapter(modules=mods), tmp_path / "a.safetensors", format="kohya")
    assert sorted(json.loads(read_header(path).metadata[NAMES_KEY]).values()) == sorted(mods)
