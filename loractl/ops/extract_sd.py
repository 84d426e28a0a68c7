"""What an extraction from two single-file Stable Diffusion checkpoints factors (sd-scripts' `extract_lora_from_models.py`).

Both files are read as diffusers checkpoints (`bases.sd_single_file.SdWeights`), so the modules are the
diffusers ones (`unet.down_blocks.…`, `text_encoder.text_model.…`), the adapter loads in diffusers, and in
kohya format in A1111/ComfyUI; OpenCLIP's fused q/k/v weight gives three modules, each factored on its
own rows. By default the linear layers and 1×1 convolutions of the UNet and text encoders are factored,
as sd-scripts does; `--targets` chooses others (3×3 convs). Every other tensor is compared, as for any
pair: `extract` streams this plan through its one loop.
"""

from __future__ import annotations

import math
import re

from ..bases.sd_single_file import SdWeights
from ..errors import ShapeMismatchError
from ..io.dtypes import FLOAT_CODES
from .extract_factor import ExtractConfig
from .extract_plan import ExtractPlan, PlanEntry, matches

_NOT_LORA = re.compile(r"(token_embedding|position_embedding|text_projection)$")


def plan_sd_extract(base: SdWeights, finetuned: SdWeights, config: ExtractConfig) -> ExtractPlan:
    """Entries sorted by name, the stored tensor in each `lowrank` entry's `reason` (from headers only)."""
    if base.base.kind != finetuned.base.kind or base.base.shapes != finetuned.base.shapes:
        raise ShapeMismatchError(
            f"{base.path} and {finetuned.path} are not the same model "
            f"(layouts {sorted({base.base.kind, finetuned.base.kind})} or tensor shapes differ)",
            hint="extract from a fine-tune of this very checkpoint",
        )
    return ExtractPlan(tuple(_entry(base, name, config) for name in sorted(base.names)))


def _entry(weights: SdWeights, name: str, config: ExtractConfig) -> PlanEntry:
    src, module = weights.sources[name], name.removesuffix(".weight")
    conv3 = len(src.shape) == 4 and math.prod(src.shape[2:]) > 1
    factorable = (
        name in weights.base.names  # a diffusers weight (the others are under their stored names)
        and name.endswith(".weight")
        and len(src.shape) in (2, 4)
        and weights.info(name).dtype in FLOAT_CODES
        and not _NOT_LORA.search(module)
    )
    if factorable and (matches(config.targets, module) if config.targets else not conv3):
        where = src.key + (f"[{src.rows[0]}:{src.rows[1]}]" if src.rows else "")
        return PlanEntry(name, module, "lowrank", src.shape, "conv" if len(src.shape) == 4 else "linear", reason=where)
    return PlanEntry(
        name, module, "compare", src.shape, reason="not a LoRA target (norm, bias, embedding, VAE, 3×3 conv)"
    )
