"""LTX-Video: its original module names are diffusers' (`LTXVideoTransformer3DModel`).

diffusers 0.42's `_convert_non_diffusers_ltxv_lora_to_diffusers` only strips `diffusion_model.`: it reads PEFT
leaves (`lora_A`/`lora_B`) and no `.alpha`, so the original layout is written so, each scale folded into B.
"""

from __future__ import annotations

import re

from .rules import Arch

# attn1/attn2 blocks are also PixArt's (whose `adaln_single` is not LTX-Video's): such adapters are named LTX-Video
# by `inspect`; nothing is renamed for either, so only the name and the original layout's leaves depend on it
_MARKS = re.compile(r"^transformer_blocks\.\d+\.attn1\.|^(caption_projection|time_embed)\.")

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
