"""Flux.1 (dev, schnell, Kontext, …): Black Forest Labs' module names ↔ diffusers' `FluxTransformer2DModel`.

From BFL's `flux/model.py` and diffusers 0.42's `convert_flux_to_diffusers` / `_convert_kohya_flux_lora_to_diffusers`:
double blocks fuse q, k, v (`img_attn.qkv`, `txt_attn.qkv`); a single block's `linear1` is q, k, v and the MLP's
input (widths 1:1:1:4, 3072 ×3 + 12288 in Flux.1); the final layer's AdaLN stores (shift, scale) where diffusers'
`norm_out` stores (scale, shift).
"""

from __future__ import annotations

import re

from .rules import Arch, Rule

_DOUBLE = (
    Rule("double_blocks.{}.img_attn.qkv", tuple(f"transformer_blocks.{{}}.attn.to_{p}" for p in "qkv")),
    Rule("double_blocks.{}.txt_attn.qkv", tuple(f"transformer_blocks.{{}}.attn.add_{p}_proj" for p in "qkv")),
    Rule("double_blocks.{}.img_attn.proj", ("transformer_blocks.{}.attn.to_out.0",)),
    Rule("double_blocks.{}.txt_attn.proj", ("transformer_blocks.{}.attn.to_add_out",)),
    Rule("double_blocks.{}.img_mlp.0", ("transformer_blocks.{}.ff.net.0.proj",)),
    Rule("double_blocks.{}.img_mlp.2", ("transformer_blocks.{}.ff.net.2",)),
    Rule("double_blocks.{}.txt_mlp.0", ("transformer_blocks.{}.ff_context.net.0.proj",)),
    Rule("double_blocks.{}.txt_mlp.2", ("transformer_blocks.{}.ff_context.net.2",)),
    Rule("double_blocks.{}.img_mod.lin", ("transformer_blocks.{}.norm1.linear",)),
    Rule("double_blocks.{}.txt_mod.lin", ("transformer_blocks.{}.norm1_context.linear",)),
)
_SINGLE = (
    Rule(
        "single_blocks.{}.linear1",
        (*(f"single_transformer_blocks.{{}}.attn.to_{p}" for p in "qkv"), "single_transformer_blocks.{}.proj_mlp"),
        ratios=(1, 1, 1, 4),
    ),
    Rule("single_blocks.{}.linear2", ("single_transformer_blocks.{}.proj_out",)),
    Rule("single_blocks.{}.modulation.lin", ("single_transformer_blocks.{}.norm.linear",)),
)
_EMBEDDERS = (
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)

FLUX1 = Arch(
    name="Flux.1",
    rules=_DOUBLE + _SINGLE + _EMBEDDERS,
    original_marks=re.compile(r"^(double_blocks|single_blocks)\.\d+\.|^(img_in|txt_in|vector_in\.|guidance_in\.)"),
    # HunyuanVideo has single blocks and a guidance embedder named so too (and is tried first, by its own names):
    # its patch embedder is `x_embedder.proj`, Flux.1's `x_embedder`
    diffusers_marks=re.compile(r"^single_transformer_blocks\.\d+\.|^(x_embedder$|time_text_embed\.guidance_embedder)"),
    blocks={
        "double blocks": ("double_blocks", "transformer_blocks"),
        "single blocks": ("single_blocks", "single_transformer_blocks"),
    },
    width_marks=re.compile(
        r"^transformer_blocks\.(\d+)\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(_context)?\.linear)$"
    ),
    widths=(3072,),
    max_blocks=19,
    text_encoders={"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"},
    kohya_text_encoders={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
    alike=("HunyuanVideo",),
)

# BFL's control LoRAs (FLUX.1 Canny / Depth [dev] LoRA) replace the qk norms' scales: full tensors, named as
# `_convert_bfl_flux_control_lora_to_diffusers` names them in diffusers' model (what `load_lora_weights` loads)
_NORMS = (
    ("double_blocks.{}.img_attn.norm.{}_norm.scale", "transformer_blocks.{}.attn.norm_{}.weight"),
    ("double_blocks.{}.txt_attn.norm.{}_norm.scale", "transformer_blocks.{}.attn.norm_added_{}.weight"),
    ("single_blocks.{}.norm.{}_norm.scale", "single_transformer_blocks.{}.attn.norm_{}.weight"),
)
_WHICH = {"original": ("query", "key"), "diffusers": ("q", "k")}


def _norm_re(template: str, which: tuple[str, str]) -> re.Pattern[str]:
    head, middle, tail = (re.escape(p) for p in template.split("{}"))
    return re.compile(rf"^{head}(\d+){middle}({'|'.join(which)}){tail}$")


def norm_name(name: str, layout: str) -> str | None:
    """A control LoRA's qk-norm scale (a transformer-relative name) in `layout` ('diffusers' or 'original');
    None when `name` is not one in the other layout."""
    source = "original" if layout == "diffusers" else "diffusers"
    for pair in _NORMS:
        names = dict(zip(("original", "diffusers"), pair, strict=True))
        match = _norm_re(names[source], _WHICH[source]).match(name)
        if match is not None:
            block, which = match.groups()
            return names[layout].format(block, _WHICH[layout][_WHICH[source].index(which)])
    return None
