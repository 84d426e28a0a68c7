"""diffusers judges loractl's Wan, Qwen-Image, SD3 and LTX-Video LoRAs in their layouts (issue 25).

Tiny `WanTransformer3DModel` / `QwenImageTransformer2DModel` (random weights, no download) load each file through
diffusers' own readers (`WanLoraLoaderMixin` / `QwenImageLoraLoaderMixin.lora_state_dict`, which convert the
original-layout `diffusion_model.` files and the musubi-tuner / kohya `lora_unet_` files) and must give the outputs
of loractl's ΔW added by hand (in diffusers' names), 1e-6 relative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import add_delta_by_hand, random_module, target_findings
from oracles import oracle

from loractl.adapter import Adapter
from loractl.formats import load_adapter, save_adapter
from loractl.io.safetensors_header import read_header
from loractl.ops.convert import convert

pytestmark = pytest.mark.interop
D = 16  # 2 heads of 8


@pytest.fixture(scope="module")
def diffusers() -> Any:
    return oracle("diffusers", "diffusers")


@dataclass(frozen=True)
class Case:
    mixin: str
    model: Callable[[Any], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    modules: dict[str, tuple[int, int]]  # canonical path (as loractl reads the file) → (out, in)


def _wan(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip


def _wan_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 1, 4, 4, generator=g), "timestep": torch.tensor([3]),
            "encoder_hidden_states": torch.randn(1, 5, 12, generator=g)}  # fmt: skip


def _qwen(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def _qwen_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 16, generator=g), "encoder_hidden_states": torch.randn(1, 5, 12, generator=g),
            "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long), "timestep": torch.tensor([0.5]),
            "img_shapes": [(1, 2, 2)]}  # fmt: skip


_WAN_BLOCK = {f"blocks.{{}}.{side}.{o}": (D, D) for side in ("self_attn", "cross_attn") for o in "qkvo"}
_WAN_BLOCK |= {"blocks.{}.ffn.0": (32, D), "blocks.{}.ffn.2": (D, 32)}
WAN = Case(
    "WanLoraLoaderMixin", _wan, _wan_inputs,
    {f"transformer.{k.format(i)}": v for i in range(2) for k, v in _WAN_BLOCK.items()}
    | {"transformer.head.head": (16, D), "transformer.text_embedding.0": (D, 12), "transformer.time_embedding.2": (D, D)},
)  # fmt: skip
_QWEN_BLOCK = {
    f"transformer_blocks.{{}}.attn.{p}": (D, D)
    for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
}
_QWEN_BLOCK |= {"transformer_blocks.{}.img_mlp.net.0.proj": (4 * D, D), "transformer_blocks.{}.txt_mlp.net.2": (D, 4 * D),
                "transformer_blocks.{}.img_mod.1": (6 * D, D)}  # fmt: skip
QWEN = Case(
    "QwenImageLoraLoaderMixin", _qwen, _qwen_inputs,
    {f"transformer.{k.format(i)}": v for i in range(2) for k, v in _QWEN_BLOCK.items()}
    | {"transformer.img_in": (D, 16), "transformer.txt_in": (D, 12), "transformer.proj_out": (16, D)},
)  # fmt: skip


def _adapter(case: Case) -> Adapter:
    modules = {n: random_module(o, i, 2 + k % 3, alpha=float(1 + k % 4), seed=k) for k, (n, (o, i)) in
               enumerate(case.modules.items())}  # fmt: skip
    return Adapter(modules={n: replace(m, A=m.A * 0.1, B=m.B * 0.1) for n, m in modules.items()})


def _run(case: Case, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**case.inputs(), return_dict=False)[0]


def _by_hand(diffusers: Any, case: Case, adapter: Adapter) -> torch.Tensor:
    model = case.model(diffusers)
    add_delta_by_hand(model, adapter)
    return _run(case, model)


def _by_diffusers(diffusers: Any, case: Case, path: Path) -> torch.Tensor:
    mixin = getattr(diffusers.loaders, case.mixin)
    model = case.model(diffusers)
    state, metadata = mixin.lora_state_dict(str(path), return_lora_metadata=True)
    assert all(k.startswith("transformer.") for k in state), [k for k in state if not k.startswith("transformer.")]
    model.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    return _run(case, model)


def _close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert (got - want).norm() <= 1e-6 * want.norm(), float((got - want).norm() / want.norm())


@pytest.mark.parametrize("case", [WAN, QWEN], ids=["wan", "qwen-image"])
def test_every_layout_loads_in_diffusers_as_loractl_applies_it(diffusers: Any, case: Case, tmp_path: Path) -> None:
    adapter = _adapter(case)
    base = _run(case, case.model(diffusers))
    want = _by_hand(diffusers, case, adapter)
    first = save_adapter(adapter, tmp_path / "original.safetensors", format="original")
    assert next(iter(read_header(first).tensors)).startswith("diffusion_model.")
    _close(_by_diffusers(diffusers, case, first), want, base)
    for to in ("kohya", "diffusers", "original"):
        out = tmp_path / f"as-{to}.safetensors"
        convert(first, out, to=to)
        _close(_by_hand(diffusers, case, load_adapter(out)), want, base)
        if case is WAN and to == "kohya":  # diffusers' musubi reader takes every block module and nothing else
            with pytest.raises((KeyError, IndexError, ValueError)):
                _by_diffusers(diffusers, case, out)
            assert target_findings(out, "diffusers")["unknown-module"] == [None]  # validate says so
            continue
        _close(_by_diffusers(diffusers, case, out), want, base)
    kohya = read_header(tmp_path / "as-kohya.safetensors").tensors
    assert any(k.startswith("lora_unet_blocks_0_self_attn_q.") or k.startswith("lora_unet_transformer_blocks_0_attn_to_q.")
               for k in kohya)  # fmt: skip


def test_wan_musubi_file_of_whole_blocks_loads_in_diffusers(diffusers: Any, tmp_path: Path) -> None:
    """diffusers' musubi-tuner reader (`_convert_musubi_wan_lora_to_diffusers`) takes only files whose every block
    has all ten modules, each with an alpha, and nothing outside the blocks: such a file converts both ways."""
    blocks = Adapter(modules={n: m for n, m in _adapter(WAN).modules.items() if n.startswith("transformer.blocks.")})
    path = save_adapter(blocks, tmp_path / "musubi.safetensors", format="kohya")
    assert "lora_unet_blocks_1_cross_attn_o.alpha" in read_header(path).tensors
    base = _run(WAN, WAN.model(diffusers))
    want = _by_hand(diffusers, WAN, blocks)
    _close(_by_diffusers(diffusers, WAN, path), want, base)
    assert target_findings(path, "diffusers") == {}
    convert(path, tmp_path / "d.safetensors", to="diffusers")
    _close(_by_diffusers(diffusers, WAN, tmp_path / "d.safetensors"), want, base)


def _sd3(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=D, pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8,
    ).eval()  # fmt: skip


def _sd3_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 4, 4, generator=g), "encoder_hidden_states": torch.randn(1, 5, 12, generator=g),
            "pooled_projections": torch.randn(1, 10, generator=g), "timestep": torch.tensor([3])}  # fmt: skip


_SD3_BLOCK = {"x_block.attn.qkv": (3 * D, D), "context_block.attn.qkv": (3 * D, D), "x_block.attn.proj": (D, D),
              "x_block.mlp.fc1": (4 * D, D), "x_block.mlp.fc2": (D, 4 * D), "x_block.adaLN_modulation.1": (6 * D, D)}  # fmt: skip
SD3 = Case(
    "SD3LoraLoaderMixin", _sd3, _sd3_inputs,
    {f"transformer.joint_blocks.{i}.{k}": v for i in range(2) for k, v in _SD3_BLOCK.items()}
    | {"transformer.joint_blocks.0.context_block.adaLN_modulation.1": (6 * D, D),
       "transformer.joint_blocks.0.context_block.mlp.fc2": (D, 4 * D),
       "transformer.joint_blocks.0.context_block.attn.proj": (D, D),
       "transformer.joint_blocks.1.context_block.adaLN_modulation.1": (2 * D, D),  # the last block: shift, scale
       "transformer.t_embedder.mlp.0": (D, 256), "transformer.y_embedder.mlp.2": (D, D),
       "transformer.final_layer.linear": (16, D), "transformer.final_layer.adaLN_modulation.1": (2 * D, D)},
)  # fmt: skip


def test_sd3_kohya_converts_to_a_diffusers_file_diffusers_applies_as_loractl_does(
    diffusers: Any, tmp_path: Path
) -> None:
    """diffusers 0.42 reads SD3 LoRAs in its own names only: the kohya (sd-scripts) file is proved through the
    conversion, whose split follows diffusers' single-file conversion of the base (fused qkv, swapped AdaLN halves)."""
    adapter = _adapter(SD3)
    path = save_adapter(adapter, tmp_path / "sd3.safetensors", format="kohya")
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in read_header(path).tensors
    assert set(load_adapter(path).modules) == set(adapter.modules)
    base = _run(SD3, SD3.model(diffusers))
    want = _by_hand(diffusers, SD3, adapter)
    convert(path, tmp_path / "d.safetensors", to="diffusers")
    _close(_by_diffusers(diffusers, SD3, tmp_path / "d.safetensors"), want, base)
    # back to kohya: at this tiny width diffusers' names do not say SD3 (test_formats_flux: at SD3's widths they do)


def _ltx(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=D, num_layers=2, caption_channels=12,
    ).eval()  # fmt: skip


def _ltx_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 8, 8, generator=g), "encoder_hidden_states": torch.randn(1, 5, 12, generator=g),
            "timestep": torch.tensor([3]), "encoder_attention_mask": torch.ones(1, 5), "num_frames": 2, "height": 2,
            "width": 2}  # fmt: skip


_LTX_BLOCK = {
    f"transformer_blocks.{{}}.{a}.{p}": (D, D) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
}
_LTX_BLOCK |= {"transformer_blocks.{}.ff.net.0.proj": (4 * D, D), "transformer_blocks.{}.ff.net.2": (D, 4 * D)}
LTX = Case(
    "LTXVideoLoraLoaderMixin", _ltx, _ltx_inputs,
    {f"transformer.{k.format(i)}": v for i in range(2) for k, v in _LTX_BLOCK.items()}
    | {"transformer.proj_in": (D, 8), "transformer.proj_out": (8, D)},
)  # fmt: skip


def test_ltx_video_original_and_diffusers_files_load_as_loractl_applies_them(diffusers: Any, tmp_path: Path) -> None:
    """LTX-Video's original files are diffusers' names under `diffusion_model.` with lora_A/lora_B and no alpha."""
    adapter = _adapter(LTX)
    base = _run(LTX, LTX.model(diffusers))
    want = _by_hand(diffusers, LTX, adapter)
    path = save_adapter(adapter, tmp_path / "ltx.safetensors", format="original")
    keys = read_header(path).tensors
    assert "diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys and not any(
        ".alpha" in k for k in keys
    )
    _close(_by_diffusers(diffusers, LTX, path), want, base)
    convert(path, tmp_path / "d.safetensors", to="diffusers")
    _close(_by_diffusers(diffusers, LTX, tmp_path / "d.safetensors"), want, base)
    _close(_by_hand(diffusers, LTX, load_adapter(path)), want, base)


def _deltas(mixin: Any, path: Path) -> dict[str, torch.Tensor]:
    """diffusers' converted state dict as ΔW per module (alphas baked into A and B by its converter)."""
    state = mixin.lora_state_dict(str(path))
    return {k.removesuffix(".lora_A.weight"): state[k.replace(".lora_A.", ".lora_B.")].double() @ state[k].double()
            for k in state if k.endswith(".lora_A.weight")}  # fmt: skip


def test_z_image_kohya_and_original_files_read_as_diffusers_reads_them(diffusers: Any, tmp_path: Path) -> None:
    """ΔW state dicts (ZImageTransformer2DModel's forward takes lists of images; the names and scales are what is
    checked): diffusers' reading of loractl's kohya and original files equals loractl's ΔW per module."""
    names = [f"{part}.{i}.{m}" for part, i in (("layers", 0), ("layers", 3), ("noise_refiner", 1))
             for m in ("attention.to_q", "attention.to_out.0", "feed_forward.w1", "adaLN_modulation.0")]  # fmt: skip
    adapter = Adapter(modules={f"transformer.{n}": random_module(D, D, 2 + k % 2, alpha=float(1 + k % 3), seed=k)
                               for k, n in enumerate(names)})  # fmt: skip
    mixin = diffusers.loaders.ZImageLoraLoaderMixin
    for to in ("kohya", "original"):
        path = save_adapter(adapter, tmp_path / f"{to}.safetensors", format=to)
        assert load_adapter(path).modules.keys() == adapter.modules.keys()
        theirs = _deltas(mixin, path)
        assert theirs.keys() == adapter.modules.keys()
        for name, m in adapter.modules.items():
            ours = m.delta_weight(torch.float64)
            assert (theirs[name] - ours).norm() <= 1e-6 * ours.norm(), (to, name)
    assert "lora_unet_noise_refiner_1_feed_forward_w1.alpha" in read_header(tmp_path / "kohya.safetensors").tensors
