"""LTX-Video: its LoRA files name modules as diffusers' `LTXVideoTransformer3DModel` does.

diffusers 0.42's `_convert_non_diffusers_ltxv_lora_to_diffusers` only strips `diffusion_model.`: it reads PEFT
leaves (`lora_A`/`lora_B`) and no `.alpha`, so the original layout is written so, each scale folded into B.
Lightricks' own checkpoint (`ltx-video-2b-v0.9.safetensors`, under `model.diffusion_model.`) names four things
otherwise (`convert_ltx_transformer_checkpoint_to_diffusers`): `patchify_proj` (`proj_in`), `adaln_single`
(`time_embed`) and the attentions' `q_norm`/`k_norm` (`norm_q`/`norm_k`); a base in that layout is read so.
"""

from __future__ import annotations

import re

from .rules import Arch, Rule

# attn1/attn2 blocks are also PixArt's (whose `adaln_single` is not LTX-Video's): such adapters are named LTX-Video
# by `inspect`; nothing is renamed for either, so only the name and the original layout's leaves depend on it
_MARKS = re.compile(r"^transformer_blocks\.\d+\.attn1\.|^(caption_projection|time_embed)\.")

_TIMESTEP = "emb.timestep_embedder"
_CHECKPOINT = (
    Rule("patchify_proj", ("proj_in",)),
    Rule("adaln_single.linear", ("time_embed.linear",)),
    *(Rule(f"adaln_single.{_TIMESTEP}.linear_{i}", (f"time_embed.{_TIMESTEP}.linear_{i}",)) for i in (1, 2)),
    *(Rule(f"transformer_blocks.{{}}.{a}.{n}_norm", (f"transformer_blocks.{{}}.{a}.norm_{n}",))
      for a in ("attn1", "attn2") for n in "qk"),
)  # fmt: skip

LTX_VIDEO = Arch(
    name="LTX-Video",
    rules=(),
    original_marks=_MARKS,
    diffusers_marks=_MARKS,
    blocks={"blocks": ("transformer_blocks", "transformer_blocks")},
    text_encoders={"text_encoder": "T5-XXL"},
    no_alpha=re.compile(""),
    original_leaves=("lora_A.weight", "lora_B.weight"),
    checkpoint_rules=_CHECKPOINT,
)
