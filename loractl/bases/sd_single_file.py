"""Single-file Stable Diffusion checkpoints (A1111/ComfyUI layout): their tensor names in diffusers' terms.

SD 1.x stores `model.diffusion_model.*` (the UNet) and `cond_stage_model.transformer.*` (CLIP);
SD 2.x `cond_stage_model.model.*` (OpenCLIP); SDXL `conditioner.embedders.0.transformer.*` (CLIP-L)
and `conditioner.embedders.1.model.*` (OpenCLIP bigG, q/k/v fused in one `in_proj_weight`).
The name map is not written here: it is what diffusers' own single-file conversion functions do,
run on stand-ins that record which stored tensor (and which rows of it, transposed or not) each
diffusers weight comes from. So loractl and `from_single_file` can never disagree.

As a base (`SingleFileBase`) it is rewritten as one safetensors file with the same names, dtypes and
metadata, plus loractl's provenance (`loractl_merge`), one tensor at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, UsageError
from ..findings import Finding, error
from ..io.checkpoint import STREAM, FingerprintViews, cache_kind, fingerprint_of_rows
from ._placement import Placement
from .protocol import TensorSink
from .safetensors_dir import CheckpointBase

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from ..io.safetensors_header import TensorInfo
    from .protocol import BaseTensor

UNET = "model.diffusion_model."
# variant → (text encoder prefix, diffusers component, kind) in the order diffusers checks them
_ENCODERS = {
    "sd1": (("cond_stage_model.transformer.", "text_encoder", "clip"),),
    "sd2": (("cond_stage_model.model.", "text_encoder", "open_clip"),),
    "sdxl": (
        ("conditioner.embedders.0.transformer.", "text_encoder", "clip"),
        ("conditioner.embedders.1.model.", "text_encoder_2", "open_clip"),
    ),
    "sdxl-refiner": (("conditioner.embedders.0.model.", "text_encoder_2", "open_clip"),),
}
_VARIANT_HINT = "loractl merges into SD 1.x, 2.x and SDXL single files (model.diffusion_model.input_blocks…)"


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


RECORD_KEY = "loractl_merge"  # the metadata entry that holds loractl's provenance in a merged file


def detect(path: Path) -> bool:
    """One safetensors file with `model.diffusion_model.*` tensors."""
    from ..io.safetensors_header import is_safetensors, read_header

    return path.is_file() and is_safetensors(path) and any(n.startswith(UNET) for n in read_header(path).tensors)


def open(path: Path) -> SingleFileBase:
    return SingleFileBase(path)


def check_single_file(names: list[str], path: str | Path) -> str:
    """The single file's variant ("sd1", "sdxl", …), or a `UsageError` for one loractl cannot map."""
    kind = variant(names)
    if kind in (None, "unet-only"):
        raise UsageError(
            f"{path}: a single-file checkpoint of an unknown layout (no SD 1.x/2.x/SDXL text encoder beside "
            "model.diffusion_model.*)",
            hint="loractl merges into SD 1.x, 2.x and SDXL single files; convert others to diffusers first",
        )
    return kind


class SingleFileBase:
    """A single-file SD checkpoint as a base: diffusers' module names placed on its stored tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.files = CheckpointBase(self.path)  # tensors, reading and closing are a checkpoint's
        self.ckpt = self.files.ckpt
        self.kind = check_single_file(self.ckpt.names, self.path)
        self.shapes = {n: self.ckpt.info(n).shape for n in self.ckpt.names}
        self.names = diffusers_names(self.shapes)

    def close(self) -> None:
        self.files.close()

    def tensors(self) -> dict[str, BaseTensor]:
        return self.files.tensors()

    def read_options(self, fmt: str, options: ReadOptions) -> ReadOptions:
        return options

    def place(self, module: str, m: ModuleInfo, adapter: AdapterInfo) -> Placement | Finding:
        return place(self.names, self.shapes, module)

    def read_float32(self, name: str) -> torch.Tensor:
        return self.files.read_float32(name)

    def weights(self) -> SdWeights:
        return SdWeights(self)

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False,
        scheme: str = STREAM,
    ) -> str | None:  # fmt: skip
        """`Checkpoint.fingerprint` of the weights in diffusers' terms (`unet.….weight`, the fused q/k/v's rows);
        None when one is stored transposed. Remembered per file identity (`io.fingerprint_cache`) unless `fresh`."""
        from ..io.fingerprint_cache import remembered

        sources = self._sources(modules)
        if sources is None:
            return None
        names = [n for n, _ in sources]
        kind = cache_kind("sd", scheme)
        return remembered(kind, [self.path], names, lambda: self._hash(sources, stop, scheme), fresh=fresh)

    def _hash(self, sources: list[tuple[str, _Src]], stop: Callable[[], bool] | None, scheme: str) -> str:
        return fingerprint_of_rows(self.ckpt, sources, self._bytes, stop, scheme)

    def _bytes(self, src: _Src) -> Iterator[memoryview]:
        """The bytes of `src`'s rows, ~16 MB at a time (a weight is never read whole to be hashed)."""
        return self.ckpt.row_chunks(src.key, *(src.rows or (0, self.shapes[src.key][0])))

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        from ..io.fingerprint_cache import remembered

        sources = self._sources(modules) or []
        return remembered("sd-views", [self.path], [n for n, _ in sources], lambda: self._views(sources))

    def _views(self, sources: list[tuple[str, _Src]]) -> dict[str, str]:
        import torch

        from ..io.tensor_bytes import torch_dtype

        views = FingerprintViews()
        for name, src in sources:
            dtype = torch_dtype(self.ckpt.info(src.key).dtype)
            views.feed(name, torch.from_numpy(self._rows(src).copy()).view(dtype).reshape(src.shape))
        return views.digests()

    def _sources(self, modules: Iterable[str]) -> list[tuple[str, _Src]] | None:
        """Each module's weight, named as the adapter names it (the fingerprint is in the adapter's terms),
        sorted; None when one is stored transposed."""
        found = [(f"{m}.weight", s) for m in modules if (s := self._source(m)) is not None]
        return None if any(s.transposed for _, s in found) else sorted(found, key=lambda x: x[0])

    def _source(self, module: str) -> _Src | None:
        """Where a module's weight is stored, under either spelling of the text encoders' names."""
        component, _, rest = module.partition(".")
        return next((s for c in _spellings(component, rest) if (s := self.names.get(f"{c}.weight"))), None)

    def _rows(self, src: _Src) -> np.ndarray[Any, Any]:
        import numpy as np

        raw = np.frombuffer(self.ckpt.raw_bytes(src.key), dtype=np.uint8).reshape(self.shapes[src.key][0], -1)
        return raw if src.rows is None else raw[src.rows[0] : src.rows[1]]

    def write(self, tmp: Path, provenance: dict[str, Any], names: Iterable[str], sink: TensorSink) -> None:
        """Every tensor in the writer's order: its bytes copied, or merged by `sink` and rounded to its dtype,
        a block of rows at a time."""
        from ._rewrite import rewrite_file

        metadata = {RECORD_KEY: json.dumps(provenance, sort_keys=True)}
        rewrite_file(self.ckpt, self.ckpt.files[0], tmp, metadata, set(names), sink)


class SdWeights:
    """The single file as a diffusers checkpoint (`protocol.Weights`, for `extract`): every tensor diffusers'
    conversion takes from the file under its diffusers name (`unet.…`, `text_encoder.…`; a fused q/k/v as
    three row ranges), the stored tensors it takes nothing from (the VAE, …) or takes transposed under their
    own names, so that every stored tensor is compared."""

    quantized: frozenset[str] = frozenset()

    def __init__(self, base: SingleFileBase) -> None:
        self.base, self.path, self.files = base, base.path, [base.path]
        mapped = {n: s for n, s in base.names.items() if not s.transposed}
        covered = {s.key for s in mapped.values()}
        self.sources = mapped | {k: _Src(k, shape) for k, shape in base.shapes.items() if k not in covered}

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, name: object) -> bool:
        """Also under the text encoders' other spelling (with or without `text_model.`), as an adapter may
        name its modules: `touched_weight_names` then finds them, and `fingerprint` takes them."""
        if not isinstance(name, str):
            return False
        return name in self.sources or self.base._source(name.removesuffix(".weight")) is not None

    def info(self, name: str) -> TensorInfo:
        src = self.sources[name]
        return self.base.ckpt.view_info(src.key, src.shape)

    def get(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        stored = self.base.ckpt.get(src.key)
        return stored if src.rows is None else stored[src.rows[0] : src.rows[1]]

    def config(self) -> dict[str, Any]:
        return {}

    def fingerprint(
        self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False, scheme: str = STREAM
    ) -> str:
        return self.base.fingerprint([n.removesuffix(".weight") for n in names], stop, fresh=fresh, scheme=scheme) or ""

    def merge_record(self) -> Any:
        header = next(iter(self.base.ckpt.headers.values()))
        try:
            return json.loads(header.metadata[RECORD_KEY]) if RECORD_KEY in header.metadata else None
        except ValueError:
            return None  # a damaged record is no evidence


def variant(names: list[str]) -> str | None:
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
    kind = variant(list(shapes))
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
            f"unknown UNet layout in the single file ({outputs} output blocks over {levels} levels)", hint=_VARIANT_HINT
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
