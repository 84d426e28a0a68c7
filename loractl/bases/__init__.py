"""Bases a LoRA is merged into: one interface, one module per kind, detected in one place.

A base lists its tensors (name, shape, stored type) from headers, says where an adapter module
lands (`place`: the name map and the layout — llama.cpp's q/k row order, OpenCLIP's fused q/k/v,
kohya's SGM names — belong to the base), reads one tensor as float32, writes merged tensors back
in its own storage (same dtype, same quantization type), fingerprints the tensors an adapter
touches in the adapter's terms, records loractl's provenance in its own metadata, and gives its
tensors as the Hugging Face checkpoint it holds (`weights`: what `extract` reads, on either side).

Kinds, in detection order (the first that claims a path wins):
    gguf            a llama.cpp GGUF model file (`gguf.py`)
    dit             a diffusion transformer (Flux.1, SD3, Wan, …): a diffusers `transformer/` directory, a
                    pipeline, or the original single file, ComfyUI's prefix or not (`dit.py`)
    sd              a single-file Stable Diffusion checkpoint (`sd_single_file.py`)
    bnb             a checkpoint saved by transformers with bitsandbytes 4-/8-bit weights (`bnb.py`)
    fp8             a checkpoint of FP8 weights with block scales, DeepSeek-V3's layout (`fp8.py`)
    safetensors     a Hugging Face checkpoint: a directory, sharded or not, or one file (`safetensors_dir.py`)

The interface is `protocol.Base` (and `protocol.RewritableBase`). A new kind of base is one module
here with `detect`, `open` and a class with those methods, and one line in `KINDS`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from .protocol import Base, OutputChoices

KINDS = {
    "gguf": "gguf", "dit": "dit", "sd": "sd_single_file", "bnb": "bnb", "fp8": "fp8", "safetensors": "safetensors_dir",
}  # detection order  # fmt: skip


def detect_base(path: str | Path) -> str:
    """The kind of base at `path` (`KINDS`); a Hugging Face checkpoint when no other kind claims it."""
    for kind, module in KINDS.items():
        if _module(module).detect(Path(path)):
            return kind
    return "safetensors"


def open_base(path: str | Path, output: OutputChoices | None = None) -> Base:
    """The base at `path`, opened from its headers (close it: `with contextlib.closing(open_base(path))`).

    `output` is what a merge asks of the output (`protocol.OutputChoices`); a dtype or a shard size is a
    `UsageError` for a kind rewritten in its own types (GGUF, single-file SD)."""
    module = _module(KINDS[detect_base(path)])
    if output is None:
        base: Base = module.open(Path(path))
        return base
    if getattr(module, "TAKES_OUTPUT_CHOICES", False):
        chosen: Base = module.open(Path(path), output)
        return chosen
    if output.dtype is not None or output.max_shard_bytes is not None:
        raise UsageError(
            "--dtype and --max-shard-size apply to Hugging Face checkpoints, not to a GGUF or single-file base",
            hint="this merge writes one file and keeps every tensor's type; drop the option",
        )
    return open_base(path)


def _module(name: str) -> Any:
    return importlib.import_module(f".{name}", __name__)
