"""HunyuanVideo: Tencent's module names ↔ diffusers' `HunyuanVideoTransformer3DModel`.

From diffusers 0.42's `_convert_hunyuan_video_lora_to_diffusers` (and the model's single-file converter): double
blocks fuse q, k, v (`img_attn_qkv`, `txt_attn_qkv`), a single block's `linear1` is q, k, v and the MLP's input
(1:1:1:4, as Flux.1's), the text refiner's `self_attn_qkv` fuses q, k, v too; the final layer's AdaLN stores
(shift, scale) where diffusers' `norm_out` stores (scale, shift). diffusers' LoRA reader swaps the halves of that
module's A as well as B's, which is no longer the same ΔW: `validate --target diffusers` warns.

Its diffusers names and widths are Flux.1's inside the blocks (3072 wide, MLP 4×): the text refiner
(`context_embedder.`), the embedders' names (`x_embedder.proj`, a Conv3d; Flux.1's `x_embedder` is a Linear), or a
double block past Flux.1's 19th / a single block past its 38th tell HunyuanVideo. An adapter of the shared blocks
alone is read as Flux.1, and `inspect` says it is HunyuanVideo's as much (`Arch.alike`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .rules import Arch, Rule

_REFINER = "txt_in.individual_token_refiner.blocks.{}"
_DIFFUSERS_REFINER = "context_embedder.token_refiner.refiner_blocks.{}"
_RULES = (
    Rule("double_blocks.{}.img_attn_qkv", tuple(f"transformer_blocks.{{}}.attn.to_{p}" for p in "qkv")),
    Rule("double_blocks.{}.txt_attn_qkv", tuple(f"transformer_blocks.{{}}.attn.add_{p}_proj" for p in "qkv")),
    Rule("double_blocks.{}.img_attn_proj", ("transformer_blocks.{}.attn.to_out.0",)),
    Rule("double_blocks.{}.txt_attn_proj", ("transformer_blocks.{}.attn.to_add_out",)),
    Rule("double_blocks.{}.img_mlp.fc1", ("transformer_blocks.{}.ff.net.0.proj",)),
    Rule("double_blocks.{}.img_mlp.fc2", ("transformer_blocks.{}.ff.net.2",)),
    Rule("double_blocks.{}.txt_mlp.fc1", ("transformer_blocks.{}.ff_context.net.0.proj",)),
    Rule("double_blocks.{}.txt_mlp.fc2", ("transformer_blocks.{}.ff_context.net.2",)),
    Rule("double_blocks.{}.img_mod.linear", ("transformer_blocks.{}.norm1.linear",)),
    Rule("double_blocks.{}.txt_mod.linear", ("transformer_blocks.{}.norm1_context.linear",)),
    Rule(
        "single_blocks.{}.linear1",
        (*(f"single_transformer_blocks.{{}}.attn.to_{p}" for p in "qkv"), "single_transformer_blocks.{}.proj_mlp"),
        ratios=(1, 1, 1, 4),
    ),
    Rule("single_blocks.{}.linear2", ("single_transformer_blocks.{}.proj_out",)),
    Rule("single_blocks.{}.modulation.linear", ("single_transformer_blocks.{}.norm.linear",)),
    Rule(f"{_REFINER}.self_attn_qkv", tuple(f"{_DIFFUSERS_REFINER}.attn.to_{p}" for p in "qkv")),
    Rule(f"{_REFINER}.self_attn_proj", (f"{_DIFFUSERS_REFINER}.attn.to_out.0",)),
    Rule(f"{_REFINER}.mlp.fc1", (f"{_DIFFUSERS_REFINER}.ff.net.0.proj",)),
    Rule(f"{_REFINER}.mlp.fc2", (f"{_DIFFUSERS_REFINER}.ff.net.2",)),
    Rule(f"{_REFINER}.adaLN_modulation.1", (f"{_DIFFUSERS_REFINER}.norm_out.linear",)),
    Rule("txt_in.input_embedder", ("context_embedder.proj_in",)),
    Rule("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    Rule("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    Rule("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    Rule("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    Rule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)
_KOHYA_JOINS = re.compile(r"(?<=\.)((?:img|txt)_attn|self_attn)\.(qkv|proj)$")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_COUNTS = {"transformer_blocks": 20, "single_transformer_blocks": 40}  # Qwen-Image: 60 blocks, none single
_WIDTH = 3072
_ATTENTION = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj)$")
_FLUX1_COUNTS = {"transformer_blocks": 19, "single_transformer_blocks": 38}


@dataclass(frozen=True)
class _HunyuanVideo(Arch):
    def is_diffusers(self, names: dict[str, int]) -> bool:
        """Its own names (the text refiner's), or a block HunyuanVideo has and Flux.1 / Qwen-Image do not."""
        if super().is_diffusers(names):
            return True
        found = [(m.group(1), int(m.group(2))) for n in names if (m := _BLOCK.match(n))]
        within = bool(found) and all(i < _COUNTS[kind] for kind, i in found)
        wide = all(w in (0, _WIDTH) for n, w in names.items() if _ATTENTION.match(n))  # SD3's first 20 blocks: 1536
        return within and wide and any(i >= _FLUX1_COUNTS[kind] for kind, i in found)

    def from_kohya(self, name: str) -> str:
        """`double_blocks.0.img_attn.qkv` (Flux.1's reading of musubi-tuner's `…_img_attn_qkv`) → `…img_attn_qkv`."""
        return _KOHYA_JOINS.sub(lambda m: m.group(1) + "_" + m.group(2), name)

    def block_counts(self, names: list[str] | dict[str, int]) -> dict[str, int]:
        """As `Arch.block_counts`, the refiner's index three names deep."""
        out = {}
        for what, prefixes in self.blocks.items():
            found = {n[len(p) + 1 :].split(".")[0] for n in names for p in prefixes if n.startswith(p + ".")}
            if found:
                out[what] = len(found)
        return out


HUNYUAN_VIDEO = _HunyuanVideo(
    name="HunyuanVideo",
    rules=_RULES,
    original_marks=re.compile(
        r"^double_blocks\.\d+\.((img|txt)_attn_(qkv|proj)|(img|txt)_mlp\.fc[12]|(img|txt)_mod\.linear)$"
        r"|^single_blocks\.\d+\.modulation\.linear$|^txt_in\.|^(time_in|guidance_in)\.mlp\.|^img_in\.proj$"
    ),
    diffusers_marks=re.compile(r"^context_embedder\.(token_refiner|proj_in|time_text_embed)\.|^x_embedder\.proj$"),
    blocks={
        "double blocks": ("double_blocks", "transformer_blocks"),
        "single blocks": ("single_blocks", "single_transformer_blocks"),
        "text refiner blocks": (
            "txt_in.individual_token_refiner.blocks",
            "context_embedder.token_refiner.refiner_blocks",
        ),
    },
    text_encoders={"text_encoder": "Llava-Llama-3", "text_encoder_2": "CLIP-L"},
    original_leaves=("lora_A.weight", "lora_B.weight"),
    no_alpha=re.compile(""),
)
