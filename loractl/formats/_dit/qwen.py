"""Qwen-Image: its original module names are diffusers' (`QwenImageTransformer2DModel`).

diffusers 0.42's `_convert_non_diffusers_qwen_lora_to_diffusers` reads `diffusion_model.` + these names and
kohya's `lora_unet_transformer_blocks_0_attn_to_q` (musubi-tuner, ai-toolkit); nothing is fused or renamed.
"""

from __future__ import annotations

import re

from .rules import Arch

_MARKS = re.compile(r"^transformer_blocks\.\d+\.(img_mlp|txt_mlp|img_mod|txt_mod)\.")

QWEN_IMAGE = Arch(
    name="Qwen-Image",
    rules=(),
    original_marks=_MARKS,
    diffusers_marks=_MARKS,
    blocks={"blocks": ("transformer_blocks", "transformer_blocks")},
    width_marks=re.compile(r"^transformer_blocks\.(\d+)\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)$"),
    widths=(3072,),
    text_encoders={"text_encoder": "Qwen2.5-VL"},
)
