"""Wan 2.x (text/image to video): the Wan repository's module names ↔ diffusers' `WanTransformer3DModel`.

From diffusers 0.42's `_convert_non_diffusers_wan_lora_to_diffusers` (ComfyUI's `diffusion_model.` files) and
`_convert_musubi_wan_lora_to_diffusers` (musubi-tuner's `lora_unet_blocks_0_self_attn_q`): renames only, no
fused projection.
"""

from __future__ import annotations

import re

from .rules import Arch, Rule

_ATTN = tuple(
    Rule(f"blocks.{{}}.{side}.{o}", (f"blocks.{{}}.{attn}.{c}",))
    for side, attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for o, c in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
)
_RULES = (
    *_ATTN,
    Rule("blocks.{}.cross_attn.k_img", ("blocks.{}.attn2.add_k_proj",)),
    Rule("blocks.{}.cross_attn.v_img", ("blocks.{}.attn2.add_v_proj",)),
    Rule("blocks.{}.ffn.0", ("blocks.{}.ffn.net.0.proj",)),
    Rule("blocks.{}.ffn.2", ("blocks.{}.ffn.net.2",)),
    Rule("time_projection.1", ("condition_embedder.time_proj",)),
    Rule("head.head", ("proj_out",)),
    Rule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    Rule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    Rule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    Rule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    Rule("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    Rule("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
)

WAN = Arch(
    name="Wan",
    rules=_RULES,
    # `blocks.0.ffn.0` (Wan's) but not `blocks.0.ffn.net.0.proj` (diffusers'): an adapter of the FFNs only
    original_marks=re.compile(
        r"^blocks\.\d+\.((self_attn|cross_attn)\.|ffn\.\d+$)|^(head\.head|time_projection|img_emb)"
    ),
    diffusers_marks=re.compile(r"^blocks\.\d+\.(attn1|attn2|ffn\.net)\.|^condition_embedder\."),
    blocks={"blocks": ("blocks", "blocks")},
    text_encoders={"text_encoder": "umT5"},
    kohya_text_encoders={},
    no_alpha=re.compile(r"^(?!blocks\.)"),  # diffusers 0.42 takes `.alpha` only inside the blocks
)
