"""Tiny random SD 1.x and SDXL models, in diffusers' layout and in the single-file (A1111) layout.

The single file is written with a converter kept here, independent of loractl: the rules of
diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` (and its SDXL sibling),
written out for any layers_per_block. Tests check it against diffusers' own conversion, so a
wrong rule here fails loudly instead of agreeing with a wrong rule in loractl.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

UNET = "model.diffusion_model."
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


@dataclass
class TinySD:
    """The models (kept for diffusers' own LoRA loading) and the single file's path."""

    kind: str
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    single_file: Path


def tiny_sd(kind: str, directory: Path) -> TinySD:
    """A seeded random SD 1.x ("sd1") or SDXL ("sdxl") model, written as one single file in `directory`."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet, encoders = (_sd1 if kind == "sd1" else _sdxl)()
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, unet.config.up_block_types)
    if kind == "sd1":
        state |= clip_to_ldm(encoders[0].state_dict(), "cond_stage_model.transformer.")
    else:
        state |= clip_to_ldm(encoders[0].state_dict(), "conditioner.embedders.0.transformer.")
        state |= open_clip_to_ldm(encoders[1].state_dict(), "conditioner.embedders.1.model.")
    state["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)  # a VAE tensor, copied untouched
    path = directory / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"modelspec.title": "tiny"})
    return TinySD(kind, unet, encoders, path)


def _clip_config(hidden: int, projection: int) -> object:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip


def _sd1() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4,
    )  # fmt: skip
    return unet, [CLIPTextModel(_clip_config(16, 16))]


def _sdxl() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
    )  # fmt: skip
    return unet, [CLIPTextModel(_clip_config(16, 16)), CLIPTextModelWithProjection(_clip_config(16, 8))]


def unet_to_ldm(state: dict[str, torch.Tensor], lpb: int, up_types: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """diffusers UNet names → `model.diffusion_model.*` (input_blocks / middle_block / output_blocks)."""
    out = {}
    for key, value in state.items():
        out[UNET + _unet_key(key, lpb, up_types)] = value
    return out


def _unet_key(key: str, lpb: int, up_types: tuple[str, ...]) -> str:
    for old, new in _FIXED.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + block * (lpb + 1) + j}.{_part(part, rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = 2 * int(m[2]) if m[1] == "resnets" else 1
        return f"middle_block.{index}.{_part(m[1], m[3])[2:]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{block * (lpb + 1) + j}.{_part(part, rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        slot = 2 if "CrossAttn" in up_types[block] else 1
        return f"output_blocks.{block * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
    raise AssertionError(f"no single-file name for {key}")


def _part(part: str, rest: str) -> str:
    if part == "attentions":
        return f"1.{rest}"
    leaf, _, tail = rest.partition(".")
    return f"0.{_RESNET[leaf]}.{tail}"


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP names → `<prefix>text_model.*` (transformers ≥ 5.6 dropped the `text_model.`)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection → OpenCLIP names, q/k/v fused into `in_proj_*`."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer, kind = m[1], m[2]
            parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", key):
            rest = m[2]
            if re.match(r"self_attn\.[kv]_proj\.", rest):
                continue
            for old, new in _OPEN_CLIP.items():
                rest = rest.replace(old, new)
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = value
    return out


def to_diffusers(kind: str, state: dict[str, torch.Tensor], lpb: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """The single file's tensors per component, converted by diffusers' own single-file code."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    config: dict[str, object] = {"layers_per_block": lpb}
    if kind == "sdxl":
        config["addition_embed_type"] = "text_time"
    out = {"unet": convert_ldm_unet_checkpoint(dict(state), config), "text_encoder": convert_ldm_clip_checkpoint(state)}
    if kind == "sdxl":
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=16))
        out["text_encoder_2"] = convert_open_clip_checkpoint(model, state, prefix="conditioner.embedders.1.model.")
    return out
