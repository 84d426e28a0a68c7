"""Stable Diffusion 3 / 3.5 (MMDiT): Stability's module names ↔ diffusers' `SD3Transformer2DModel`.

From sd-scripts' `networks/lora_sd3.py` (kohya names `lora_unet_joint_blocks_0_x_block_attn_qkv`) and diffusers'
single-file conversion `convert_sd3_transformer_checkpoint_to_diffusers`: each joint block fuses q, k, v for the
image stream (`x_block`) and the text stream (`context_block`); SD3.5 Medium's second image attention
(`x_block.attn2`) too; the final layer's AdaLN stores (shift, scale), diffusers' `norm_out` (scale, shift), and
so does the last joint block's context AdaLN (2·width outputs instead of 6·width).
diffusers 0.42 has no reader of these names for SD3 (its SD3 loader takes diffusers' names only).
"""

from __future__ import annotations

import re

from .rules import Arch, Rule

_RULES = (
    Rule("joint_blocks.{}.x_block.attn.qkv", tuple(f"transformer_blocks.{{}}.attn.to_{p}" for p in "qkv")),
    Rule("joint_blocks.{}.context_block.attn.qkv", tuple(f"transformer_blocks.{{}}.attn.add_{p}_proj" for p in "qkv")),
    Rule("joint_blocks.{}.x_block.attn2.qkv", tuple(f"transformer_blocks.{{}}.attn2.to_{p}" for p in "qkv")),
    Rule("joint_blocks.{}.x_block.attn.proj", ("transformer_blocks.{}.attn.to_out.0",)),
    Rule("joint_blocks.{}.context_block.attn.proj", ("transformer_blocks.{}.attn.to_add_out",)),
    Rule("joint_blocks.{}.x_block.attn2.proj", ("transformer_blocks.{}.attn2.to_out.0",)),
    Rule("joint_blocks.{}.x_block.mlp.fc1", ("transformer_blocks.{}.ff.net.0.proj",)),
    Rule("joint_blocks.{}.x_block.mlp.fc2", ("transformer_blocks.{}.ff.net.2",)),
    Rule("joint_blocks.{}.context_block.mlp.fc1", ("transformer_blocks.{}.ff_context.net.0.proj",)),
    Rule("joint_blocks.{}.context_block.mlp.fc2", ("transformer_blocks.{}.ff_context.net.2",)),
    Rule("joint_blocks.{}.x_block.adaLN_modulation.1", ("transformer_blocks.{}.norm1.linear",)),
    Rule(
        "joint_blocks.{}.context_block.adaLN_modulation.1",
        ("transformer_blocks.{}.norm1_context.linear",),
        swap_two_halves=True,  # the last block's: (shift, scale) ↔ (scale, shift), as diffusers converts the base
    ),
    Rule("context_embedder", ("context_embedder",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)

SD3 = Arch(
    name="SD3",
    rules=_RULES,
    original_marks=re.compile(r"^joint_blocks\.\d+\.|^(t_embedder|y_embedder)\."),
    diffusers_marks=re.compile(r"^transformer_blocks\.\d+\.attn2\.|^pos_embed\."),
    blocks={"joint blocks": ("joint_blocks", "transformer_blocks")},
    width_marks=re.compile(
        r"^transformer_blocks\.(\d+)\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(_context)?\.linear)$"
    ),
    widths=(1536, 2432),
    text_encoders={"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"},
    kohya_text_encoders={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
)
