"""diffusers judges loractl's HunyuanVideo LoRAs (issue 25).

A tiny `HunyuanVideoTransformer3DModel` (random weights, no download) loads each file through diffusers' own reader
(`HunyuanVideoLoraLoaderMixin.lora_state_dict`, which runs `_convert_hunyuan_video_lora_to_diffusers` on original
files, then the transformer's `load_lora_adapter`) and must give the outputs of loractl's ΔW added by hand.
diffusers' converter hardcodes the real width (3072) of a single block's `linear1`, so that module is checked at
real widths on the state dicts instead; its reading of the final AdaLN swaps A's halves too, and of the text
refiner's `self_attn_qkv` splits A's rank in three (neither the same ΔW), which `validate --target diffusers` reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import add_delta_by_hand, random_module, target_findings
from oracles import oracle

from loractl.adapter import Adapter
from loractl.formats import architecture, in_layout, load_adapter, save_adapter
from loractl.ops.convert import convert

pytestmark = pytest.mark.interop
H = 32  # the tiny model's width: 2 heads of 16


@pytest.fixture(scope="module")
def diffusers() -> Any:
    return oracle("diffusers", "diffusers")


def _model(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, text_embed_dim=24, pooled_projection_dim=20, rope_axes_dim=(4, 6, 6),
    ).eval()  # fmt: skip


def _run(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4, 1, 2, 3, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
        "encoder_attention_mask": torch.ones(1, 5),
        "pooled_projections": torch.randn(1, 20, generator=g),
        "guidance": torch.tensor([3500.0]),
    }
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _by_hand(diffusers: Any, adapter: Adapter) -> torch.Tensor:
    model = _model(diffusers)
    add_delta_by_hand(model, adapter)
    return _run(model)


def _by_diffusers(diffusers: Any, path: Path) -> torch.Tensor:
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin

    model = _model(diffusers)
    state, metadata = HunyuanVideoLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    assert state and all(k.startswith("transformer.") for k in state), sorted(state)[:3]
    model.load_lora_adapter(state, prefix="transformer", network_alphas=None, metadata=metadata)
    return _run(model)


REFINER = "txt_in.individual_token_refiner.blocks.0"
ORIGINAL = {
    "double_blocks.0.img_attn_qkv": (3 * H, H), "double_blocks.0.txt_attn_qkv": (3 * H, H),
    "double_blocks.0.img_attn_proj": (H, H), "double_blocks.0.txt_attn_proj": (H, H),
    "double_blocks.0.img_mlp.fc1": (4 * H, H), "double_blocks.0.img_mlp.fc2": (H, 4 * H),
    "double_blocks.0.txt_mlp.fc1": (4 * H, H), "double_blocks.0.txt_mlp.fc2": (H, 4 * H),
    "double_blocks.0.img_mod.linear": (6 * H, H), "double_blocks.0.txt_mod.linear": (6 * H, H),
    "single_blocks.0.linear2": (H, 5 * H), "single_blocks.0.modulation.linear": (3 * H, H),
    f"{REFINER}.self_attn_proj": (H, H),
    f"{REFINER}.mlp.fc1": (4 * H, H), f"{REFINER}.mlp.fc2": (H, 4 * H), f"{REFINER}.adaLN_modulation.1": (2 * H, H),
    "txt_in.input_embedder": (H, 24), "txt_in.t_embedder.mlp.0": (H, 256), "txt_in.c_embedder.linear_2": (H, H),
    "time_in.mlp.0": (H, 256), "time_in.mlp.2": (H, H), "guidance_in.mlp.2": (H, H),
    "vector_in.in_layer": (H, 20), "final_layer.linear": (4, H),
}  # fmt: skip


def _adapter(names: dict[str, tuple[int, int]] = ORIGINAL) -> Adapter:
    from dataclasses import replace

    modules = {}
    for i, (name, (out, inp)) in enumerate(names.items()):
        m = random_module(out, inp, 2 + i % 3, alpha=float(1 + i % 4), seed=i)
        modules[f"transformer.{name}"] = replace(m, A=m.A * 0.05, B=m.B * 0.05)
    return Adapter(modules=modules)


def _close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert (got - want).norm() <= 1e-6 * want.norm(), float((got - want).norm() / want.norm())


def test_hunyuan_video_is_recognised_in_both_layouts() -> None:
    adapter = _adapter()
    found = architecture({n: m.in_features for n, m in adapter.modules.items()})
    assert found["name"] == "HunyuanVideo" and found["layout"] == "original"
    assert found["blocks"] == {"double blocks": 1, "single blocks": 1, "text refiner blocks": 1}
    split = in_layout(adapter, "diffusers")
    found = architecture({n: m.in_features for n, m in split.modules.items()})
    assert found["name"] == "HunyuanVideo" and found["layout"] == "diffusers"
    # diffusers' names inside the blocks are Flux.1's: a block Flux.1 lacks (its 20th double block) tells them apart
    late = {"transformer.transformer_blocks.19.attn.to_q": 3072, "transformer.transformer_blocks.0.attn.to_k": 3072}
    assert architecture(late)["name"] == "HunyuanVideo"
    assert architecture({"transformer.transformer_blocks.3.attn.to_q": 3072})["name"] == "Flux.1"
    sd3 = {f"transformer.transformer_blocks.{i}.attn.to_q": 1536 for i in range(20)}  # SD3's first 20 blocks
    assert architecture(sd3)["name"] == "SD3"


@pytest.mark.parametrize("layout", ["original", "diffusers", "kohya"])
def test_each_layout_reads_in_diffusers_as_loractl_applies_it(diffusers: Any, tmp_path: Path, layout: str) -> None:
    """loractl's file in `layout` and its conversion to the other layouts; diffusers reads the original and diffusers
    layouts (it has no kohya reader for HunyuanVideo: those are checked by loractl's reading only)."""
    adapter = _adapter()
    path = save_adapter(adapter, tmp_path / f"{layout}.safetensors", format=layout)
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, adapter)
    _close(_by_hand(diffusers, load_adapter(path)), want, base)
    if layout != "kohya":
        _close(_by_diffusers(diffusers, path), want, base)
    for to in ("original", "diffusers", "kohya"):
        out = tmp_path / f"{layout}-as-{to}"
        convert(path, out, to=to)
        _close(_by_hand(diffusers, load_adapter(out)), want, base)
        if to != "kohya":
            _close(_by_diffusers(diffusers, out), want, base)


def test_single_block_linear1_at_real_width_matches_diffusers_deltas(diffusers: Any, tmp_path: Path) -> None:
    """linear1 (21504, 3072) = q, k, v (3072 each) and the MLP's input (12288): ΔW per part against diffusers'."""
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin

    modules = {
        "transformer.single_blocks.0.linear1": random_module(21504, 3072, 2, alpha=1.0, seed=3),
        "transformer.double_blocks.0.img_attn_qkv": random_module(9216, 3072, 2, alpha=4.0, seed=4),
    }
    path = save_adapter(Adapter(modules=modules), tmp_path / "o.safetensors", format="original")
    split = in_layout(load_adapter(path), "diffusers")
    theirs = HunyuanVideoLoraLoaderMixin.lora_state_dict(str(path))
    assert {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")} == set(split.modules)
    for name, m in split.modules.items():
        ours = m.delta_weight(torch.float64)
        got = theirs[f"{name}.lora_B.weight"].double() @ theirs[f"{name}.lora_A.weight"].double()
        assert (got - ours).norm() <= 1e-6 * ours.norm(), name


def test_validate_names_what_diffusers_would_read_wrong_or_not_at_all(tmp_path: Path) -> None:
    misread = {"final_layer.adaLN_modulation.1": (2 * H, H), f"{REFINER}.self_attn_qkv": (3 * H, H)}
    original = save_adapter(_adapter(ORIGINAL | misread), tmp_path / "o.safetensors", format="original")
    assert target_findings(original, "diffusers") == {
        "swapped-halves": ["transformer.final_layer.adaLN_modulation.1"],
        "split-rank": [f"transformer.{REFINER}.self_attn_qkv"],
    }
    # diffusers' files of the same modules load as they are
    split = save_adapter(_adapter(misread), tmp_path / "m.safetensors", format="diffusers")
    assert target_findings(split, "diffusers") == {}
    no_qkv = {n: w for n, w in ORIGINAL.items() if "attn_qkv" not in n}
    single = save_adapter(_adapter(no_qkv), tmp_path / "s.safetensors", format="original")
    assert target_findings(single, "diffusers") == {"unknown-module": [None]}
    kohya = save_adapter(_adapter(), tmp_path / "k.safetensors", format="kohya")
    assert target_findings(kohya, "diffusers") == {"unknown-module": [None]}
    assert target_findings(kohya, "kohya") == {}
    split = save_adapter(in_layout(_adapter(), "diffusers"), tmp_path / "d.safetensors", format="diffusers")
    assert target_findings(split, "diffusers") == {}
    assert "unknown-module" in target_findings(split, "kohya")
