"""diffusers judges loractl's Flux.2 LoRAs in every layout (issue 25).

A tiny `Flux2Transformer2DModel` (random weights, no download) loads each file through diffusers' own reader
(`Flux2LoraLoaderMixin.lora_state_dict`: `_convert_kohya_flux2_lora_to_diffusers`,
`_convert_non_diffusers_flux2_lora_to_diffusers`, `_convert_non_diffusers_flux2_lokr_to_diffusers`; then the
transformer's `load_lora_adapter`) and must give the outputs of loractl's ΔW added by hand. Flux.2's converters
split by proportions, not hardcoded widths, so every module is checked at the tiny width.
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
H = 32  # the tiny model's width: 2 heads of 16; MLP 3·H (SwiGLU: linear_in 6·H)
LAYOUTS = ("diffusers", "kohya", "original")


@pytest.fixture(scope="module")
def diffusers() -> Any:
    return oracle("diffusers", "diffusers")


def _model(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
    ).eval()  # fmt: skip


def _run(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 6, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randn(6, 4, generator=g),
        "txt_ids": torch.zeros(5, 4),
    }
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _by_hand(diffusers: Any, adapter: Adapter) -> torch.Tensor:
    """The tiny model with loractl's ΔW (in diffusers' layout) added to each weight."""
    model = _model(diffusers)
    add_delta_by_hand(model, adapter)
    return _run(model)


def _by_diffusers(diffusers: Any, path: Path) -> torch.Tensor:
    """The outputs with diffusers' reading of `path` (every key it keeps named under `transformer.`)."""
    from diffusers.loaders import Flux2LoraLoaderMixin

    model = _model(diffusers)
    state, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    assert state and all(k.startswith("transformer.") for k in state), sorted(state)[:3]
    model.load_lora_adapter(state, prefix="transformer", network_alphas=None, metadata=metadata)
    return _run(model)


ORIGINAL = {
    "double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.txt_attn.qkv": (3 * H, H),
    "double_blocks.0.img_attn.proj": (H, H), "double_blocks.0.txt_attn.proj": (H, H),
    "double_blocks.0.img_mlp.0": (6 * H, H), "double_blocks.0.img_mlp.2": (H, 3 * H),
    "double_blocks.0.txt_mlp.0": (6 * H, H), "double_blocks.0.txt_mlp.2": (H, 3 * H),
    "single_blocks.0.linear1": (9 * H, H), "single_blocks.0.linear2": (H, 4 * H),
    "img_in": (H, 4), "txt_in": (H, 24), "time_in.in_layer": (H, 16), "time_in.out_layer": (H, H),
    "guidance_in.in_layer": (H, 16), "final_layer.linear": (4, H),
    "double_stream_modulation_img.lin": (6 * H, H), "double_stream_modulation_txt.lin": (6 * H, H),
    "single_stream_modulation.lin": (3 * H, H), "final_layer.adaLN_modulation.1": (2 * H, H),
}  # fmt: skip
# what diffusers 0.42's kohya reader of Flux.2 renames (it warns of the others and leaves them out)
KOHYA_READ = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "final_layer.linear")
# diffusers' reader of the original layout renames final_layer.adaLN_modulation.1 to norm_out.linear without the
# (shift, scale) → (scale, shift) swap its model converter makes: the outputs differ, so it is checked apart
SWAPPED = "transformer.final_layer.adaLN_modulation.1"


def _adapter(names: dict[str, tuple[int, int]] = ORIGINAL) -> Adapter:
    from dataclasses import replace

    modules = {}
    for i, (name, (out, inp)) in enumerate(names.items()):
        m = random_module(out, inp, 2 + i % 3, alpha=float(1 + i % 4), seed=i)
        modules[f"transformer.{name}"] = replace(m, A=m.A * 0.05, B=m.B * 0.05)
    return Adapter(modules=modules)


def _without(adapter: Adapter, test: Any) -> Adapter:
    return Adapter(modules={n: m for n, m in adapter.modules.items() if not test(n)})


def _close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert (got - want).norm() <= 1e-6 * want.norm(), float((got - want).norm() / want.norm())


def test_flux2_names_are_recognised_in_both_layouts() -> None:
    adapter = _adapter()
    widths = {n: m.in_features for n, m in adapter.modules.items()}
    assert architecture(widths)["name"] == "Flux.2"
    # without the shared modulation: single-block and MLP widths (4·H and 3·H in; Flux.1's are 5·H and 4·H)
    blocks = {n: w for n, w in widths.items() if "blocks." in n}
    assert architecture(blocks)["name"] == "Flux.2"
    assert architecture({n: w for n, w in blocks.items() if "attn" in n})["name"] == "Flux.1"  # attention alone: 3072?
    split = in_layout(adapter, "diffusers")
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in split.modules  # kept fused, as diffusers
    found = architecture({n: m.in_features for n, m in split.modules.items()})
    assert found["name"] == "Flux.2" and found["layout"] == "diffusers"
    assert found["blocks"] == {"double blocks": 1, "single blocks": 1}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_in_diffusers_as_loractl_applies_it(diffusers: Any, tmp_path: Path, layout: str) -> None:
    """Written by loractl in `layout`, read by diffusers; then converted to every other layout, read again."""
    adapter = _adapter()
    if layout == "kohya":
        adapter = _without(adapter, lambda n: not n.removeprefix("transformer.").startswith(KOHYA_READ))
    if layout == "original":
        adapter = _without(adapter, lambda n: n == SWAPPED)
    path = save_adapter(adapter, tmp_path / f"{layout}.safetensors", format=layout)
    read = load_adapter(path)
    assert read.meta.source_format == layout
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, adapter)
    _close(_by_hand(diffusers, read), want, base)
    _close(_by_diffusers(diffusers, path), want, base)
    kohya_read = _by_hand(
        diffusers, _without(adapter, lambda n: not n.removeprefix("transformer.").startswith(KOHYA_READ))
    )
    for to in LAYOUTS:
        out = tmp_path / f"{layout}-as-{to}"
        convert(path, out, to=to)
        _close(_by_hand(diffusers, load_adapter(out)), want, base)
        if to == "original" and SWAPPED in in_layout(adapter, "original").modules:
            continue  # diffusers reads it unswapped: `test_final_layer_adaln_follows_the_model_converter…`
        _close(_by_diffusers(diffusers, out), kohya_read if to == "kohya" else want, base)


def test_diffusers_parts_with_their_own_a_stack_for_kohya(diffusers: Any, tmp_path: Path) -> None:
    """q, k, v trained apart: kohya's fused qkv is block-diagonal (rank 2+3+4), exact, and diffusers agrees."""
    names = {f"transformer_blocks.0.attn.to_{p}": (H, H) for p in "qkv"}
    names["single_transformer_blocks.0.attn.to_out"] = (H, 4 * H)
    adapter = _adapter(names)
    path = save_adapter(adapter, tmp_path / "split.safetensors", format="diffusers")
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, adapter)
    convert(path, tmp_path / "fused.safetensors", to="kohya")
    fused = load_adapter(tmp_path / "fused.safetensors")
    assert fused.modules["transformer.double_blocks.0.img_attn.qkv"].rank == 2 + 3 + 4
    _close(_by_diffusers(diffusers, tmp_path / "fused.safetensors"), want, base)


def test_final_layer_adaln_follows_the_model_converter_not_diffusers_lora_reader(
    diffusers: Any, tmp_path: Path
) -> None:
    """loractl swaps the final AdaLN's halves as diffusers' Flux.2 model converter does; diffusers' LoRA reader of
    the original layout does not (0.42), and `validate --target diffusers` says so; loractl's diffusers file loads."""
    # the shared modulation says Flux.2 (the final layer alone is also Flux.1's)
    adapter = _adapter({"final_layer.adaLN_modulation.1": (2 * H, H), "single_stream_modulation.lin": (3 * H, H)})
    original = save_adapter(adapter, tmp_path / "o.safetensors", format="original")
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, adapter)
    assert (_by_diffusers(diffusers, original) - want).norm() > 1e-3 * want.norm()
    assert target_findings(original, "diffusers")["swapped-halves"] == [SWAPPED]
    convert(original, tmp_path / "d.safetensors", to="diffusers")
    _close(_by_diffusers(diffusers, tmp_path / "d.safetensors"), want, base)


def _lokr_file(tmp_path: Path) -> Path:
    """ai-toolkit's Flux.2 LoKr: BFL names, w1 full and w2 = w2_a·w2_b (rank 2, alpha 3), or both full (no scale)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    state = {}
    for name, (out, inp) in {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.0.linear2": (H, 4 * H),
                             "double_blocks.0.txt_mlp.2": (H, 3 * H)}.items():  # fmt: skip
        key = f"diffusion_model.{name}"
        state[f"{key}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.3  # factor 4, which diffusers must infer
        if name.endswith("txt_mlp.2"):  # both full: LyCORIS applies no alpha
            state[f"{key}.lokr_w2"] = torch.randn(out // 4, inp // 4, generator=g) * 0.1
        else:
            state[f"{key}.lokr_w2_a"] = torch.randn(out // 4, 2, generator=g) * 0.1
            state[f"{key}.lokr_w2_b"] = torch.randn(2, inp // 4, generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(state, tmp_path / "lokr.safetensors")
    return tmp_path / "lokr.safetensors"


def test_lokr_file_reads_as_the_exact_lora_diffusers_applies(diffusers: Any, tmp_path: Path) -> None:
    path = _lokr_file(tmp_path)
    read = load_adapter(path)
    assert (
        read.meta.source_format == "original"
        and architecture({n: m.in_features for n, m in read.modules.items()})["name"] == "Flux.2"
    )
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, read)
    _close(_by_diffusers(diffusers, path), want, base)
    for to in LAYOUTS:
        convert(path, tmp_path / f"as-{to}", to=to)
        _close(_by_diffusers(diffusers, tmp_path / f"as-{to}"), want, base)


def test_lycoris_lokr_file_reads_as_the_exact_lora_diffusers_applies(diffusers: Any, tmp_path: Path) -> None:
    """LyCORIS wrapping diffusers' transformer (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`, diffusers'
    `_convert_lycoris_flux2_lokr_to_diffusers`): diffusers' module names, read as the exact LoRA."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    state = {}
    for name, (out, inp) in {"transformer_blocks_0_attn_to_q": (H, H), "transformer_blocks_0_ff_linear_out": (H, 3 * H),
                             "single_transformer_blocks_0_attn_to_qkv_mlp_proj": (9 * H, H)}.items():  # fmt: skip
        key = f"lycoris_{name}"
        state[f"{key}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.3
        state[f"{key}.lokr_w2_a"] = torch.randn(out // 4, 2, generator=g) * 0.1
        state[f"{key}.lokr_w2_b"] = torch.randn(2, inp // 4, generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(state, tmp_path / "lycoris.safetensors")
    read = load_adapter(tmp_path / "lycoris.safetensors")
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in read.modules
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, read)
    _close(_by_diffusers(diffusers, tmp_path / "lycoris.safetensors"), want, base)
    for to in LAYOUTS:
        convert(tmp_path / "lycoris.safetensors", tmp_path / f"as-{to}", to=to)
        _close(_by_diffusers(diffusers, tmp_path / f"as-{to}"), want, base)


def test_validate_names_what_diffusers_kohya_reader_leaves_out(tmp_path: Path) -> None:
    kohya = save_adapter(_adapter(), tmp_path / "k.safetensors", format="kohya")
    left = {n.removeprefix("transformer.") for n in ORIGINAL if not n.startswith(KOHYA_READ)}
    assert sorted(target_findings(kohya, "diffusers")["unknown-module"]) == sorted(f"transformer.{n}" for n in left)
    assert target_findings(kohya, "kohya") == {}
    split = save_adapter(in_layout(_adapter(), "diffusers"), tmp_path / "d.safetensors", format="diffusers")
    assert target_findings(split, "diffusers") == {}
    assert len(target_findings(split, "kohya")["unknown-module"]) == len(in_layout(_adapter(), "diffusers").modules)
