"""Z-Image: its original module names are diffusers' (`ZImageTransformer2DModel`).

diffusers 0.42's `_convert_non_diffusers_z_image_lora_to_diffusers` reads `diffusion_model.` + these names and
kohya's `lora_unet_layers_0_attention_to_q` (with `.alpha`); nothing is fused or renamed.
"""

from __future__ import annotations

import re

from .rules import Arch

_MARKS = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward|adaLN_modulation)\.")

Z_IMAGE = Arch(
    name="Z-Image",
    rules=(),
    original_marks=_MARKS,
    diffusers_marks=_MARKS,
    blocks={
        "layers": ("layers", "layers"),
        "noise refiner": ("noise_refiner", "noise_refiner"),
        "context refiner": ("context_refiner", "context_refiner"),
    },
    text_encoders={"text_encoder": "Qwen3"},
)
