"""Flux.1 LoRAs in kohya, original, XLabs and diffusers layouts: names, and the exact split ↔ fuse (issue 25)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import random_module, run_cli, target_findings

from loractl.adapter import Adapter
from loractl.errors import AdapterError
from loractl.formats import detect_format, in_layout, load_adapter, save_adapter
from loractl.io.safetensors_header import read_header
from loractl.ops.convert import convert

H = 16
ORIGINAL = {
    "transformer.double_blocks.0.img_attn.qkv": (3 * H, H),
    "transformer.double_blocks.1.txt_attn.qkv": (3 * H, H),
    "transformer.single_blocks.0.linear1": (7 * H, H),
    "transformer.single_blocks.2.modulation.lin": (3 * H, H),
    "transformer.final_layer.adaLN_modulation.1": (2 * H, H),
    "transformer.time_in.in_layer": (H, 256),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
}


def _original() -> Adapter:
    return Adapter(modules={n: random_module(o, i, 2 + k % 2, alpha=1.0 + k, seed=k) for k, (n, (o, i)) in
                            enumerate(ORIGINAL.items())})  # fmt: skip


def _dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight(torch.float64) for n, m in adapter.modules.items()}


def test_split_gives_each_part_its_rows_of_the_fused_delta() -> None:
    """The dense reference: diffusers' q, k, v, proj_mlp are row blocks of ΔW(linear1); norm_out swaps halves."""
    fused = _dense(_original())
    split = in_layout(_original(), "diffusers")
    rows = torch.cat([split.modules[f"transformer.single_transformer_blocks.0.{p}"].delta_weight(torch.float64)
                      for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])  # fmt: skip
    assert torch.equal(rows, fused["transformer.single_blocks.0.linear1"])
    assert split.modules["transformer.single_transformer_blocks.0.proj_mlp"].out_features == 4 * H
    norm = split.modules["transformer.norm_out.linear"].delta_weight(torch.float64)
    assert torch.equal(torch.cat([norm[H:], norm[:H]]), fused["transformer.final_layer.adaLN_modulation.1"])
    assert split.modules["transformer.time_text_embed.timestep_embedder.linear_1"].in_features == 256
    assert all(m.A is split.modules["transformer.transformer_blocks.0.attn.to_q"].A for n, m in split.modules.items()
               if n.startswith("transformer.transformer_blocks.0."))  # fmt: skip


def test_kohya_diffusers_kohya_round_trip_keeps_ranks_and_bits(tmp_path: Path) -> None:
    kohya = save_adapter(_original(), tmp_path / "k.safetensors", format="kohya")
    keys = list(read_header(kohya).tensors)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert (
        "lora_unet_single_blocks_0_linear1.alpha" in keys and "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
    )
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    convert(kohya, tmp_path / "d.safetensors", to="diffusers")
    diff = load_adapter(tmp_path / "d.safetensors")
    assert "transformer.transformer_blocks.1.attn.add_v_proj" in diff.modules
    convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", to="kohya")
    back = load_adapter(tmp_path / "k2.safetensors")
    assert {n: m.rank for n, m in back.modules.items()} == {n: m.rank for n, m in _original().modules.items()}
    for name, delta in _dense(_original()).items():
        assert torch.equal(back.modules[name].delta_weight(torch.float64), delta), name


def test_parts_with_their_own_a_stack_block_diagonally_and_rank_truncates(tmp_path: Path) -> None:
    mods = {f"transformer.single_transformer_blocks.0.attn.to_{p}": random_module(H, H, r, alpha=a, seed=r)
            for p, r, a in (("q", 2, 1.0), ("k", 3, 6.0), ("v", 4, 2.0))}  # fmt: skip
    split = Adapter(modules=mods)
    fused = in_layout(split, "kohya").modules["transformer.single_blocks.0.linear1"]
    assert fused.rank == 9 and fused.out_features == 7 * H  # the MLP's rows, not adapted, are zero
    want = torch.cat(
        [m.delta_weight(torch.float64) for m in mods.values()] + [torch.zeros(4 * H, H, dtype=torch.float64)]
    )
    assert (fused.delta_weight(torch.float64) - want).abs().max() <= 1e-6 * want.abs().max()
    src = save_adapter(split, tmp_path / "split.safetensors", format="diffusers")
    with pytest.raises(AdapterError, match="lose"):
        convert(src, tmp_path / "k.safetensors", to="kohya", rank=_rank(4))
    report = convert(src, tmp_path / "k.safetensors", to="kohya", rank=_rank(4), allow_loss=True)
    assert load_adapter(tmp_path / "k.safetensors").modules["transformer.single_blocks.0.linear1"].rank == 4
    assert report.truncated and report.truncated[0].rel_error > 0


def _rank(r: int) -> object:
    from loractl.ops.lowrank import RankRule

    return RankRule(rank=r)


def test_original_layout_reads_comfyui_keys_and_writes_lora_down(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    m = random_module(3 * H, H, 2, seed=1)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": m.A,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": m.B,
               "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": m.A[:, :8].clone(),
               "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": m.B[:8].clone()},
              tmp_path / "c.safetensors")  # fmt: skip
    assert detect_format(tmp_path / "c.safetensors") == "original"
    read = load_adapter(tmp_path / "c.safetensors")
    assert read.modules["transformer.double_blocks.0.img_attn.qkv"].scale == 1.0  # no alpha: scale 1
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in read.modules
    out = save_adapter(read, tmp_path / "o.safetensors", format="original")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in read_header(out).tensors
    kohya = save_adapter(read, tmp_path / "k.safetensors", format="kohya")
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in read_header(kohya).tensors
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in load_adapter(kohya).modules


def test_dora_parts_are_refused_not_fused() -> None:
    m = random_module(H, H, 2, seed=3)
    dora = {f"transformer.single_transformer_blocks.0.attn.to_{p}": replace(m, magnitude=torch.ones(H)) for p in "qk"}
    with pytest.raises(AdapterError, match="DoRA"):
        in_layout(Adapter(modules=dora), "kohya")


def test_double_blocks_alone_are_flux_only_at_flux_width() -> None:
    """SD3 names its joint blocks as diffusers names Flux.1's double blocks: only Flux's 3072 says Flux."""
    small = Adapter(modules={"transformer.transformer_blocks.0.attn.to_q": random_module(H, H, 2)})
    assert in_layout(small, "kohya") is small
    wide = Adapter(modules={"transformer.transformer_blocks.0.attn.to_q": random_module(3072, 3072, 1)})
    assert list(in_layout(wide, "kohya").modules) == ["transformer.double_blocks.0.img_attn.qkv"]


def test_inspect_shows_the_architecture(tmp_path: Path) -> None:
    import json

    kohya = save_adapter(_original(), tmp_path / "k.safetensors", format="kohya")
    code, out, _ = run_cli("inspect", kohya, "--json")
    arch = json.loads(out)["architecture"]
    assert code == 0 and arch["name"] == "Flux.1" and arch["layout"] == "original"
    assert arch["blocks"] == {"double blocks": 2, "single blocks": 2}
    assert arch["outside_blocks"] == ["final_layer.adaLN_modulation.1", "time_in.in_layer"]
    assert arch["text_encoders"] == {"text_encoder": "CLIP-L"}
    _, text, _ = run_cli("inspect", kohya)
    assert "Flux.1 transformer, original names" in text


def test_validate_targets_name_what_each_consumer_would_not_load(tmp_path: Path) -> None:
    kohya = save_adapter(_original(), tmp_path / "k.safetensors", format="kohya")
    assert target_findings(kohya, "kohya") == {}
    assert sorted(target_findings(kohya, "diffusers")["unknown-module"]) == [
        "transformer.final_layer.adaLN_modulation.1", "transformer.time_in.in_layer"]  # fmt: skip
    split = save_adapter(in_layout(_original(), "diffusers"), tmp_path / "d.safetensors", format="diffusers")
    assert target_findings(split, "diffusers") == {}
    named = target_findings(split, "kohya")["unknown-module"]
    assert len(named) == 13 and all(n.startswith("transformer.") for n in named)  # the text encoder's is fine
    code, _, err = run_cli("validate", split, "--target", "kohya")
    assert code == 1 and "loractl convert --to kohya" in _ + err


def test_sd3_and_wan_diffusers_names_fuse_back_exactly() -> None:
    """SD3 at its real width (1536): diffusers' split q/k/v fuse to `joint_blocks.N.x_block.attn.qkv`; the last
    block's context AdaLN (2·width rows) swaps halves; Wan renames only."""
    shared = random_module(1536, 1536, 2, seed=4)
    parts = {f"transformer.transformer_blocks.23.attn.to_{p}": replace(shared, B=shared.B * (i + 1))
             for i, p in enumerate("qkv")}  # fmt: skip
    parts["transformer.transformer_blocks.23.norm1_context.linear"] = random_module(3072, 1536, 2, seed=5)
    fused = in_layout(Adapter(modules=parts), "kohya").modules
    assert sorted(fused) == ["transformer.joint_blocks.23.context_block.adaLN_modulation.1",
                             "transformer.joint_blocks.23.x_block.attn.qkv"]  # fmt: skip
    assert fused["transformer.joint_blocks.23.x_block.attn.qkv"].rank == 2
    norm = parts["transformer.transformer_blocks.23.norm1_context.linear"].delta_weight()
    ada = fused["transformer.joint_blocks.23.context_block.adaLN_modulation.1"].delta_weight()
    assert torch.equal(torch.cat([ada[1536:], ada[:1536]]), norm)
    wan = Adapter(modules={"transformer.blocks.3.attn2.to_out.0": random_module(H, H, 2)})
    assert list(in_layout(wan, "original").modules) == ["transformer.blocks.3.cross_attn.o"]


def test_a_fused_module_of_the_wrong_width_is_refused_with_a_hint() -> None:
    odd = Adapter(modules={"transformer.single_blocks.0.linear1": random_module(10, 8, 2)})
    with pytest.raises(AdapterError, match="do not split") as caught:
        in_layout(odd, "diffusers")
    assert caught.value.hint
