"""LTX-Video: its original module names are diffusers' (`LTXVideoTransformer3DModel`).

diffusers 0.42's `_convert_non_diffusers_ltxv_lora_to_diffusers` only strips `diffusion_model.`: it reads PEFT
leaves (`lora_A`/`lora_B`) and no `.alpha`, so the original layout is written so, each scale folded into B.
"""

from __future__ import annotations

import re

from .rules import Arch

_MARKS = re.compile(r"^transformer_blocks\.\d+\.attn1\.|^(caption_projection|adaln_single)\.")

LTX_VIDEO = Arch(
    name="LTX-Video",
    rules=(),
    original_marks=_MARKS,
    diffusers_marks=_MARKS,
    blocks={"blocks": ("transformer_blocks", "transformer_blocks")},
    text_encoders={"text_encoder": "T5-XXL"},
    no_alpha=re.compile(""),
    original_leaves=("lora_A.weight", "lora_B.weight"),
)
