"""What a file holds when it holds no LoRA pair: the words of the error that refuses it.

A reader forced onto a file of another layout (`--from loralib` on a vision model's custom
`w_a_*`/`w_b_*` tensors) finds no module; an adapter without a module is never valid, and the
error says what the file holds instead. The 2023 lora_diffusion "safeloras" layout
(cloneofsimo/lora `save_safeloras_with_embeds`, FORMATS.md §9) is named: its modules are numbered
in the traversal order of the model classes of the diffusers version that wrote it, not named,
so no reader can map them to module paths honestly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SAFELORAS = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
SAFELORAS_HINT = (
    "load it with lora_diffusion itself (its patch_pipe rebuilds the numbering from the pipeline's model classes); "
    "loractl reads adapters whose modules are named"
)
_DIGITS = re.compile(r"\d+")
_SHOWN = 4


def is_safeloras(keys: Sequence[str]) -> bool:
    """Keys like `unet:0:up` / `unet:0:down` (lora_diffusion's safetensors)."""
    return any(SAFELORAS.match(k) for k in keys)


def contents(keys: Sequence[str]) -> str:
    """`12 tensors, none a LoRA pair (w_a_*, w_b_*)`, or the safeloras layout named with its module count."""
    if is_safeloras(keys):
        modules = {m[1] + m[2] for k in keys if (m := SAFELORAS.match(k))}
        return (
            f"a 2023 lora_diffusion 'safeloras' file: {len(modules)} LoRA modules numbered by model traversal "
            "order ('unet:0:up', 'unet:0:down'), not named"
        )
    patterns = list(dict.fromkeys(_DIGITS.sub("*", k) for k in keys))
    shown = ", ".join(patterns[:_SHOWN]) + (", …" if len(patterns) > _SHOWN else "")
    what = f"{len(keys)} tensor{'s' * (len(keys) != 1)}"
    return f"{what}, none a LoRA pair ({shown})" if keys else "no tensor"
