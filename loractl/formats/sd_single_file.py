"""Single-file Stable Diffusion checkpoints (A1111/ComfyUI layout): their tensor names in diffusers' terms.

SD 1.x stores `model.diffusion_model.*` (the UNet) and `cond_stage_model.transformer.*` (CLIP);
SD 2.x `cond_stage_model.model.*` (OpenCLIP); SDXL `conditioner.embedders.0.transformer.*` (CLIP-L)
and `conditioner.embedders.1.model.*` (OpenCLIP bigG, q/k/v fused in one `in_proj_weight`).
The name map is not written here: it is what diffusers' own single-file conversion functions do,
run on stand-ins that record which stored tensor (and which rows of it, transposed or not) each
diffusers weight comes from. So loractl and `from_single_file` can never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

from ..errors import FormatError, UsageError
from ..findings import Finding, error
from ._placement import Placement

UNET = "model.diffusion_model."
# layout → (text encoder prefix, diffusers component, kind) in the order diffusers checks them
_ENCODERS = {
    "sd1": (("cond_stage_model.transformer.", "text_encoder", "clip"),),
    "sd2": (("cond_stage_model.model.", "text_encoder", "open_clip"),),
    "sdxl": (
        ("conditioner.embedders.0.transformer.", "text_encoder", "clip"),
        ("conditioner.embedders.1.model.", "text_encoder_2", "open_clip"),
    ),
    "sdxl-refiner": (("conditioner.embedders.0.model.", "text_encoder_2", "open_clip"),),
}
_LAYOUT_HINT = "loractl merges into SD 1.x, 2.x and SDXL single files (model.diffusion_model.input_blocks…)"


@dataclass(frozen=True)
class _Src:
    """A stand-in tensor: which stored tensor a converted weight is, and how it was cut or turned."""

    key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    transposed: bool = False

    def __getitem__(self, index: Any) -> _Src:
        first = index[0] if isinstance(index, tuple) else index
        if not isinstance(first, slice) or first.step not in (None, 1) or self.rows or self.transposed:
            raise FormatError(f"internal: unexpected cut {index!r} of {self.key}")
        start, stop, _ = first.indices(self.shape[0])
        return replace(self, shape=(stop - start, *self.shape[1:]), rows=(start, stop))

    @property
    def T(self) -> _Src:
        return replace(self, shape=tuple(reversed(self.shape)), transposed=not self.transposed)

    def clone(self) -> _Src:
        return self

    detach = contiguous = clone


def layout(names: list[str]) -> str | None:
    """ "sd1", "sd2", "sdxl", "sdxl-refiner"; None when `names` are not a single-file SD checkpoint."""
    if not any(n.startswith(UNET) for n in names):
        return None
    for kind, encoders in _ENCODERS.items():
        if any(n.startswith(encoders[0][0]) for n in names) and (
            len(encoders) == 1 or any(n.startswith(encoders[1][0]) for n in names)
        ):
            return kind
    return "unet-only"


def diffusers_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, _Src]:
    """`unet.…` / `text_encoder.…` / `text_encoder_2.…` tensor names → where each is stored, by diffusers' code."""
    kind = layout(list(shapes))
    if kind is None:
        raise FormatError("not a single-file Stable Diffusion checkpoint (no model.diffusion_model.* tensors)")
    srcs = {k: _Src(k, s) for k, s in shapes.items()}
    out = {f"unet.{k}": v for k, v in _unet(srcs).items() if isinstance(v, _Src)}
    for prefix, component, clip in _ENCODERS.get(kind, ()):
        converted = _clip(srcs, prefix) if clip == "clip" else _open_clip(srcs, prefix)
        out |= {f"{component}.{k}": v for k, v in converted.items() if isinstance(v, _Src)}
    return out


def place(names: dict[str, _Src], shapes: dict[str, tuple[int, ...]], module: str) -> Placement | Finding:
    """The stored tensor an adapter module (`unet.down_blocks.…`, `text_encoder.text_model.…`) updates."""
    component, _, rest = module.partition(".")
    for candidate in _spellings(component, rest):
        src = names.get(f"{candidate}.weight")
        if src is not None:
            return Placement(src.key, rows=src.rows, transposed=src.transposed)
    if component == "unet" and f"{UNET}{rest}.weight" in shapes:  # kohya SDXL files name the SGM modules
        return Placement(f"{UNET}{rest}.weight")
    return error("not-in-base", "no tensor of this single-file checkpoint for the module", module)


def _spellings(component: str, rest: str) -> list[str]:
    """transformers ≥ 5.6 dropped CLIPTextModel's `text_model.`; adapters use either spelling."""
    bare = rest.removeprefix("text_model.")
    return [f"{component}.{rest}", f"{component}.text_model.{bare}", f"{component}.{bare}"]


def _unet(srcs: dict[str, _Src]) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = [n.removeprefix(UNET) for n in srcs if n.startswith(UNET)]
    levels = 1 + sum(bool(re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", n)) for n in names)
    outputs = len({n.split(".")[1] for n in names if n.startswith("output_blocks.")})
    if not outputs or outputs % levels:
        raise UsageError(
            f"unknown UNet layout in the single file ({outputs} output blocks over {levels} levels)", hint=_LAYOUT_HINT
        )
    config: dict[str, Any] = {"layers_per_block": outputs // levels - 1}
    if f"{UNET}label_emb.0.0.weight" in srcs:
        config["addition_embed_type"] = "text_time"
    converted: dict[str, Any] = convert_ldm_unet_checkpoint(dict(srcs), config)  # type: ignore[no-untyped-call]
    return converted


def _clip(srcs: dict[str, _Src], prefix: str) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    converted: dict[str, Any] = convert_ldm_clip_checkpoint(  # type: ignore[no-untyped-call]
        {k: v for k, v in srcs.items() if k.startswith(prefix)}
    )
    return converted


def _open_clip(srcs: dict[str, _Src], prefix: str) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    width = next((s.shape[-1] for k, s in srcs.items() if k.startswith(prefix) and k.endswith("in_proj_weight")), 0)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=width))  # used only without text_projection
    converted: dict[str, Any] = convert_open_clip_checkpoint(model, dict(srcs), prefix=prefix)  # type: ignore[no-untyped-call]
    return converted
