"""Which merge a base needs: a Hugging Face checkpoint (`merge`), a GGUF model, or a single-file SD checkpoint.

Decided from the file's first bytes and header, so `merge --dry-run` stays header-only whatever the base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from .placement import PlacedMergeReport, PlacedPlan

Layout = Literal["gguf", "sd"]
Track = Callable[[Iterable[str], int], Iterable[str]]  # wraps the tensor loop (a progress bar)


def base_layout(base: str | Path) -> Layout | None:
    """ "gguf" for a GGUF file, "sd" for one safetensors file with `model.diffusion_model.*`; None otherwise."""
    from ..formats.gguf.model import is_gguf_model
    from ..formats.sd_single_file import UNET
    from ..io.safetensors_header import is_safetensors, read_header

    path = Path(base)
    if is_gguf_model(path):
        return "gguf"
    if path.is_file() and is_safetensors(path) and any(n.startswith(UNET) for n in read_header(path).tensors):
        return "sd"
    return None


def plan_layout_merge(
    layout: Layout, base: str | Path, adapters: Sequence[str | Path], *, weights: Sequence[float] | None = None
) -> PlacedPlan:
    """The plan, from headers only (`--dry-run`)."""
    if layout == "gguf":
        from .merge_gguf import plan_gguf_merge

        return plan_gguf_merge(base, adapters, weights=weights)
    from .merge_sd import plan_sd_merge

    return plan_sd_merge(base, adapters, weights=weights)


def merge_layout(
    layout: Layout,
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    force: bool = False,
    track: Track | None = None,
) -> PlacedMergeReport:
    """Merge into a GGUF model or a single-file SD checkpoint, writing the one file `output`."""
    if layout == "gguf":
        from .merge_gguf import merge_gguf

        return merge_gguf(base, adapters, output, weights=weights, force=force, track=track)
    from .merge_sd import merge_sd

    return merge_sd(base, adapters, output, weights=weights, force=force, track=track)
