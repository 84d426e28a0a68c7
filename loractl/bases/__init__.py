"""Bases a LoRA is merged into: one interface, one module per kind, detected in one place.

A base lists its tensors (name, shape, stored type) from headers, says where an adapter module
lands (`place`: the name map and the layout — llama.cpp's q/k row order, OpenCLIP's fused q/k/v,
kohya's SGM names — belong to the base), reads one tensor as float32, writes merged tensors back
in its own storage (same dtype, same quantization type), fingerprints the tensors an adapter
touches in the adapter's terms, records loractl's provenance in its own metadata, and gives its
tensors as the Hugging Face checkpoint it holds (`weights`: what `extract` reads, on either side).

Kinds, in detection order (the first that claims a path wins):
    gguf            a llama.cpp GGUF model file (`gguf.py`)
    sd              a single-file Stable Diffusion checkpoint (`sd_single_file.py`)
    safetensors     a Hugging Face checkpoint: a directory, sharded or not, or one file (`safetensors_dir.py`)

The interface is `protocol.Base` (and `protocol.RewritableBase`). A new kind of base is one module
here with `detect`, `open` and a class with those methods, and one line in `KINDS`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import Base

KINDS = {"gguf": "gguf", "sd": "sd_single_file", "safetensors": "safetensors_dir"}  # detection order


def detect_base(path: str | Path) -> str:
    """The kind of base at `path` (`KINDS`); a Hugging Face checkpoint when no other kind claims it."""
    for kind, module in KINDS.items():
        if _module(module).detect(Path(path)):
            return kind
    return "safetensors"


def open_base(path: str | Path) -> Base:
    """The base at `path`, opened from its headers (close it: `with contextlib.closing(open_base(path))`)."""
    base: Base = _module(KINDS[detect_base(path)]).open(Path(path))
    return base


def _module(name: str) -> Any:
    return importlib.import_module(f".{name}", __name__)
