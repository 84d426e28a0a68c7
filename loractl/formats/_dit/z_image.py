"""Z-Image: its LoRA files name modules as diffusers' `ZImageTransformer2DModel` does.

diffusers 0.42's `_convert_non_diffusers_z_image_lora_to_diffusers` reads `diffusion_model.` + these names and
kohya's `lora_unet_layers_0_attention_to_q` (with `.alpha`); nothing is fused or renamed.
The model's own checkpoint (ComfyUI's `z_image_turbo_bf16.safetensors`: Lumina 2's NextDiT names) fuses q, k, v
(`attention.qkv`, 1:1:1) and names `attention.out` (`to_out.0`), `q_norm`/`k_norm`, `x_embedder` and
`final_layer` (`all_x_embedder.2-1`, `all_final_layer.2-1`: patch 2, frame patch 1), as
`convert_z_image_transformer_checkpoint_to_diffusers` reads them; a base in that layout is read so, and an adapter
in those names (ComfyUI's native ones; diffusers' LoRA reader renames `attention.out` itself) converts to
diffusers' names: `qkv` split with its A shared, exactly.
"""

from __future__ import annotations

import re

from .rules import Arch, Rule

_MARKS = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward|adaLN_modulation)\.")

_ATTENTION = tuple(f"{blocks}.{{}}.attention" for blocks in ("layers", "noise_refiner", "context_refiner"))
_CHECKPOINT = (
    *(Rule(f"{a}.qkv", tuple(f"{a}.to_{p}" for p in "qkv")) for a in _ATTENTION),
    *(Rule(f"{a}.out", (f"{a}.to_out.0",)) for a in _ATTENTION),
    *(Rule(f"{a}.{n}_norm", (f"{a}.norm_{n}",)) for a in _ATTENTION for n in "qk"),
    Rule("x_embedder", ("all_x_embedder.2-1",)),
    Rule("final_layer.linear", ("all_final_layer.2-1.linear",)),
    Rule("final_layer.adaLN_modulation.1", ("all_final_layer.2-1.adaLN_modulation.1",)),
)

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
    checkpoint_rules=_CHECKPOINT,
    adapters_split_checkpoint_names=True,  # diffusers' reader renames `attention.out`; `qkv` splits exactly
)
