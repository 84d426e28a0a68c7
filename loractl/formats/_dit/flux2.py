"""Flux.2 (dev, klein): Black Forest Labs' module names ↔ diffusers' `Flux2Transformer2DModel`.

From diffusers 0.42's `convert_flux2_transformer_checkpoint_to_diffusers`, `_convert_kohya_flux2_lora_to_diffusers`
and `_convert_non_diffusers_flux2_lora_to_diffusers`: double blocks fuse q, k, v as Flux.1's do; a single block's
`linear1` (q, k, v and the SwiGLU MLP's input) and `linear2` stay fused in diffusers too (`attn.to_qkv_mlp_proj`,
`attn.to_out`); the MLPs are `ff.linear_in/linear_out`; modulation is shared by all blocks
(`double_stream_modulation_img.lin`, …); the final layer's AdaLN stores (shift, scale) where diffusers' `norm_out`
stores (scale, shift), as the model converter says (diffusers' LoRA reader of the original layout renames it without
swapping: `validate --target diffusers` warns). The original layout has no `.alpha` (diffusers' reader refuses any
key it does not rename), so each scale is folded into B there.

Flux.2's original names are Flux.1's for attention, MLPs and single blocks: the shared modulation modules, or the
widths (a single block's `linear2` takes 4× the width in Flux.2, 5× in Flux.1; a double block's MLP output 3×, not
4×; FLUX.2 [dev] is 6144 wide) tell them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .rules import Arch, Rule

_DOUBLE = (
    Rule("double_blocks.{}.img_attn.qkv", tuple(f"transformer_blocks.{{}}.attn.to_{p}" for p in "qkv")),
    Rule("double_blocks.{}.txt_attn.qkv", tuple(f"transformer_blocks.{{}}.attn.add_{p}_proj" for p in "qkv")),
    Rule("double_blocks.{}.img_attn.proj", ("transformer_blocks.{}.attn.to_out.0",)),
    Rule("double_blocks.{}.txt_attn.proj", ("transformer_blocks.{}.attn.to_add_out",)),
    Rule("double_blocks.{}.img_mlp.0", ("transformer_blocks.{}.ff.linear_in",)),
    Rule("double_blocks.{}.img_mlp.2", ("transformer_blocks.{}.ff.linear_out",)),
    Rule("double_blocks.{}.txt_mlp.0", ("transformer_blocks.{}.ff_context.linear_in",)),
    Rule("double_blocks.{}.txt_mlp.2", ("transformer_blocks.{}.ff_context.linear_out",)),
)
_SINGLE = (
    Rule("single_blocks.{}.linear1", ("single_transformer_blocks.{}.attn.to_qkv_mlp_proj",)),
    Rule("single_blocks.{}.linear2", ("single_transformer_blocks.{}.attn.to_out",)),
)
_OUTSIDE = (
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    Rule("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    Rule("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    Rule("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)
_WIDTH_OF = re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear1)$")
_TIMES_WIDTH = (  # (module, how many widths it takes in Flux.2; Flux.1's differs)
    (re.compile(r"^single_blocks\.\d+\.linear2$"), 4),
    (re.compile(r"^double_blocks\.\d+\.(img|txt)_mlp\.2$"), 3),
)


@dataclass(frozen=True)
class _Flux2(Arch):
    def is_original(self, names: dict[str, int]) -> bool:
        """The shared modulation's names, FLUX.2 [dev]'s width, or the single-block / MLP widths of Flux.2."""
        if super().is_original(names):
            return True
        widths = {w for n, w in names.items() if _WIDTH_OF.match(n) and w > 0}  # kohya's names alone: 0
        if any(w in self.widths for w in widths):
            return any(n.startswith(("double_blocks.", "single_blocks.")) for n in names)
        if len(widths) != 1:
            return False
        width = widths.pop()
        return any(w == times * width for n, w in names.items() for p, times in _TIMES_WIDTH if p.match(n))


FLUX2 = _Flux2(
    name="Flux.2",
    rules=_DOUBLE + _SINGLE + _OUTSIDE,
    original_marks=re.compile(r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin$"),
    diffusers_marks=re.compile(
        r"^single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$|^transformer_blocks\.\d+\.ff(_context)?\."
        r"linear_(in|out)$|^time_guidance_embed\.|^(double_stream_modulation_(img|txt)|single_stream_modulation)\.linear$"
    ),
    blocks={
        "double blocks": ("double_blocks", "transformer_blocks"),
        "single blocks": ("single_blocks", "single_transformer_blocks"),
    },
    width_marks=re.compile(r"^transformer_blocks\.(\d+)\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)$"),
    widths=(6144,),
    max_blocks=8,
    text_encoders={"text_encoder": "Mistral Small 3.1"},
    no_alpha=re.compile(""),
    original_leaves=("lora_A.weight", "lora_B.weight"),
)
