"""Diffusion transformers (Flux.1, Flux.2, SD3/3.5, Wan, Qwen-Image, HunyuanVideo, LTX-Video, Z-Image) as bases.

A base is either diffusers' (`transformer/diffusion_pytorch_model*.safetensors`, sharded with an index or not,
or a whole pipeline directory whose `transformer/` is merged) or the original single file (`flux1-dev.safetensors`:
`double_blocks.N.img_attn.qkv.weight`, q/k/v fused; with ComfyUI's `model.diffusion_model.` prefix or BFL's
bare names). The name map is the adapters' own (`formats._dit`: one rule per original module, and the renames
only a model's own checkpoint has, `Arch.checkpoint_rules`: LTX-Video's `patchify_proj`, Z-Image's fused
`attention.qkv`), read the other way: each weight in diffusers' terms (`transformer_blocks.0.attn.to_q.weight`)
is a stored tensor, or rows of a fused one, or one with its row halves exchanged (the final AdaLN's shift/scale
order). So an adapter in either layout merges into either base: a split module lands on its rows of the fused tensor, a fused module
on each split tensor (`Placement.part`: its rows of ΔW).

The fingerprint, and `extract`'s view of the base (`DitWeights`), are in diffusers' terms whatever the file's
layout: an adapter extracted from one layout, converted to another, still matches its base in both.
Rewritten tensor by tensor (`_rewrite.rewrite_file`): same names, dtypes, shards and index, loractl's
provenance in each file's metadata (`loractl_merge`); the rest of a pipeline directory is copied. A pipeline's
text encoders (`text_encoder*/`, transformers checkpoints) take the adapter's text-encoder modules, each tensor
named as stored: one whose names another merged component shares (SD3's two CLIPs) is left out, and refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, LoractlError, ShapeMismatchError, UsageError
from ..findings import Finding, error
from ..formats._dit import COMPONENT, Layout, recognise
from ..io.checkpoint import STREAM, Checkpoint, FingerprintViews, cache_kind, fingerprint_of_rows
from ._placement import Placement
from .protocol import BaseTensor, TensorSink
from .sd_single_file import RECORD_KEY

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..formats._dit.rules import Arch, Rule
    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from ..io.safetensors_header import TensorInfo

# Where a file keeps the transformer's tensors: ComfyUI's checkpoints, the original repos' own, bare names.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
PIPELINE_INDEX = "model_index.json"


@dataclass(frozen=True)
class _Src:
    """Where one weight in diffusers' terms is stored: a tensor, its rows, its row halves exchanged."""

    key: str
    shape: tuple[int, ...]  # in diffusers' terms (the rows when `rows` is set)
    rows: tuple[int, int] | None = None
    swap: bool = False


@dataclass(frozen=True)
class Identified:
    """A file's transformer: its architecture, the layout of its names, and the prefix they carry."""

    arch: Arch
    layout: Layout
    prefix: str


def identify(shapes: dict[str, tuple[int, ...]]) -> Identified | None:
    """The transformer whose weights `shapes` (stored name → shape) holds, by the adapters' name rules."""
    for prefix in PREFIXES:
        rels = {
            n[len(prefix) : -len(".weight")]: (s[1] if len(s) >= 2 else 0)
            for n, s in shapes.items()
            if n.startswith(prefix) and n.endswith(".weight")
        }
        found = recognise({COMPONENT + r: w for r, w in rels.items()}) if rels else None
        if found is not None and found.arch.block_counts(list(rels)):  # a model has its blocks (SD's UNet
            # has a `time_embed` as LTX-Video has, but no top-level `transformer_blocks`)
            return Identified(found.arch, _layout(found.arch, list(rels)), prefix)
    return None


def _layout(arch: Arch, names: list[str]) -> Layout:
    """The layout most of a base's weights are named in: a whole model tells apart what one adapter module may
    not (Wan's diffusers `blocks.0.ffn.net.0.proj` also looks like its original `blocks.0.ffn.`)."""
    original = sum(arch.match_checkpoint(n) is not None for n in names)
    split = sum(arch.renamed_in_checkpoint(n) for n in names)
    return "original" if original > split else "diffusers"  # one vocabulary (Qwen-Image): diffusers' names


def diffusers_sources(found: Identified, shapes: dict[str, tuple[int, ...]]) -> dict[str, _Src]:
    """Each transformer tensor in diffusers' terms (`transformer_blocks.0.attn.to_q.weight`, …) → where it is
    stored. An original tensor no rule names (a norm's scale, …) has no entry, unless the architecture's names are
    diffusers' but for its rules (LTX-Video, Z-Image: `Arch.shares_names`)."""
    out: dict[str, _Src] = {}
    for key, shape in shapes.items():
        if not key.startswith(found.prefix):
            continue
        rel = key[len(found.prefix) :]
        if found.layout == "diffusers":
            out[rel] = _Src(key, shape)
            continue
        stem, _, leaf = rel.rpartition(".")
        match = found.arch.match_checkpoint(stem) if leaf in ("weight", "bias") else None
        if match is None:
            if found.arch.shares_names:
                out[rel] = _Src(key, shape)
            continue
        rule, index = match
        names = rule.diffusers_names(index)
        weight = shapes.get(f"{found.prefix}{stem}.weight", shape)
        if len(names) == 1:
            out[f"{names[0]}.{leaf}"] = _Src(key, shape, swap=len(weight) == 2 and rule.swaps(*weight))
            continue
        try:
            sizes = rule.sizes(out_features=shape[0])
        except AdapterError:
            continue  # widths this architecture does not split: left as stored
        start = 0
        for name, size in zip(names, sizes, strict=True):
            out[f"{name}.{leaf}"] = _Src(key, (size, *shape[1:]), (start, start + size))
            start += size
    return out


def _locate(path: Path) -> Path | None:
    """The weights of the transformer at `path`: the file itself, the directory, or a pipeline's `transformer/`."""
    from ..io.safetensors_header import is_safetensors

    if path.is_file():
        return path if is_safetensors(path) else None
    if path.is_dir():
        if (path / PIPELINE_INDEX).is_file() and (path / "transformer").is_dir():
            return path / "transformer"
        if any(path.glob("diffusion_pytorch_model*.safetensors")):
            return path
    return None


def detect(path: Path) -> bool:
    """A safetensors file, a diffusers model directory or a pipeline whose tensors are a known transformer's."""
    where = _locate(path)
    if where is None:
        return False
    try:
        with Checkpoint(where) as ckpt:
            return identify({n: ckpt.info(n).shape for n in ckpt.names}) is not None
    except LoractlError:
        return False


def open(path: Path) -> DitBase:
    return DitBase(path)


class DitBase:
    """A diffusion transformer as a base (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        weights = _locate(self.path)
        if weights is None:
            raise UsageError(f"{path}: not a diffusion transformer", hint="give a transformer file or directory")
        self.pipeline = weights != self.path and self.path.is_dir()  # a pipeline: its transformer/ is merged
        self.ckpt = Checkpoint(weights)
        self.shapes = {n: self.ckpt.info(n).shape for n in self.ckpt.names}
        found = identify(self.shapes)
        if found is None:
            raise UsageError(f"{path}: not a diffusion transformer loractl knows", hint="see docs/merge.md")
        self.found = found
        self.sources = diffusers_sources(found, self.shapes)
        self.kind = f"{found.arch.name} {found.layout}"
        self.encoders = _encoders(self.path, found.arch, set(self.shapes)) if self.pipeline else {}
        self.owner = {n: c for c in self.encoders.values() for n in c.names}  # a text encoder's tensor → its checkpoint

    def close(self) -> None:
        self.ckpt.close()
        for encoder in self.encoders.values():
            encoder.close()

    def tensors(self) -> dict[str, BaseTensor]:
        out = {n: BaseTensor(n, s, self.ckpt.info(n).dtype) for n, s in self.shapes.items()}
        return out | {n: BaseTensor(n, c.info(n).shape, c.info(n).dtype) for n, c in self.owner.items()}

    def read_options(self, fmt: str, options: ReadOptions) -> ReadOptions:
        return options

    def place(self, module: str, m: ModuleInfo, adapter: AdapterInfo) -> Placement | tuple[Placement, ...] | Finding:
        """A module in diffusers' terms on its tensor (or rows); an original module on its own tensor, or on
        each of diffusers' split tensors."""
        if not module.startswith(COMPONENT):
            return self._place_encoder(module)
        rel = self._relative(module)
        src = self.sources.get(f"{rel}.weight")
        if src is not None:
            return Placement(src.key, rows=src.rows, swap_halves=src.swap)
        own = f"{self.found.prefix}{rel}.weight"
        if self.found.layout == "original" and own in self.shapes:
            return Placement(own)
        parts = self._parts(rel)
        if parts is None:
            return error("not-in-base", f"no tensor of this {self.kind} transformer for the module", module)
        rule, _, srcs = parts
        if sum(s.shape[0] for s in srcs) != m.out_features:
            have = "+".join(str(s.shape[0]) for s in srcs)
            return error("shape-mismatch", f"ΔW has {m.out_features} rows but the base's parts have {have}", module)
        swap = rule.swaps(m.out_features, m.in_features)
        if len(srcs) == 1:
            return Placement(srcs[0].key, swap_halves=swap)
        starts = [sum(s.shape[0] for s in srcs[:i]) for i in range(len(srcs))]
        return tuple(Placement(s.key, part=(a, a + s.shape[0])) for s, a in zip(srcs, starts, strict=True))

    def _place_encoder(self, module: str) -> Placement | Finding:
        """A text encoder's module on its weight in the pipeline's `text_encoder*/` (a transformers checkpoint)."""
        component, _, rel = module.partition(".")
        encoder = self.encoders.get(component)
        if encoder is None:
            return self._encoder_refused(component, module)
        key = f"{rel}.weight"
        head, _, rest = rel.partition(".")
        if key not in encoder and not any(n.startswith(f"{head}.") for n in encoder.names):
            key = f"{rest}.weight"  # saved without the base model's prefix (CLIP's `text_model.` by transformers 5)
        if key not in encoder:
            return error("not-in-base", f"{component}/ has no tensor {f'{rel}.weight'!r}", module)
        return Placement(key)

    def _encoder_refused(self, component: str, module: str) -> Finding:
        """Why a text encoder's module has no place here, and what to give instead."""
        if not self.pipeline:
            message = (
                f"this base is a {self.found.arch.name} transformer only: a text encoder's module merges into its model"
            )
            hint = f"give the whole pipeline directory as the base (model_index.json, {component}/): its {component}/ takes it"
        else:
            message = f"the pipeline has no {component}/ in safetensors with tensor names no other component shares"
            hint = (f"merge {component} with a tool that loads it apart (SD3's two CLIP encoders share their names), or "
                    "give an adapter without its modules")  # fmt: skip
        return replace(error("not-in-base", message, module), hint=hint)

    def _relative(self, module: str) -> str:
        """A transformer module's name in this base's architecture: a kohya name read as another architecture's
        (musubi-tuner's HunyuanVideo `img_attn_qkv`, the same string as Flux.1's `img_attn.qkv`) is this one's."""
        return self.found.arch.from_kohya(module[len(COMPONENT) :])

    def _parts(self, rel: str) -> tuple[Rule, list[str], list[_Src]] | None:
        """An original module's rule, its diffusers weights and their sources, when the base has all of them."""
        match = self.found.arch.match_checkpoint(rel)
        if match is None:
            return None
        names = match[0].diffusers_names(match[1])
        srcs = [self.sources.get(f"{n}.weight") for n in names]
        return None if any(s is None for s in srcs) else (match[0], names, [s for s in srcs if s is not None])

    def read_float32(self, name: str) -> torch.Tensor:
        return self.owner.get(name, self.ckpt).get(name).float()

    def weights(self) -> DitWeights:
        return DitWeights(self)

    def canonical(self, modules: Iterable[str]) -> list[tuple[str, _Src]]:
        """The weights `modules` apply to, in diffusers' terms (`transformer.….weight`), sorted."""
        out: dict[str, _Src] = {}
        for module in modules:
            if not module.startswith(COMPONENT):
                continue
            rel = self._relative(module)
            parts = self._parts(rel) if f"{rel}.weight" not in self.sources else None
            names = [rel] if parts is None else parts[1]
            out |= {f"{COMPONENT}{n}.weight": s for n in names if (s := self.sources.get(f"{n}.weight"))}
        return sorted(out.items())

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False,
        scheme: str = STREAM,
    ) -> str | None:  # fmt: skip
        """`Checkpoint.fingerprint` of the weights in diffusers' terms, whatever the file's layout: remembered per
        file identity (`io.fingerprint_cache`) unless `fresh`."""
        from ..io.fingerprint_cache import remembered

        sources = self.canonical(modules)
        names = [n for n, _ in sources]
        kind = cache_kind("dit", scheme)
        return remembered(kind, self.ckpt.files, names, lambda: self._hash(sources, stop, scheme), fresh=fresh)

    def _hash(self, sources: list[tuple[str, _Src]], stop: Callable[[], bool] | None, scheme: str) -> str:
        return fingerprint_of_rows(self.ckpt, sources, self._bytes, stop, scheme)

    def _bytes(self, src: _Src) -> Iterator[memoryview]:
        """The bytes of `src` (its rows, its row halves exchanged), ~16 MB at a time: a fused weight is read once
        per part of it, never whole (`linear1`: 132 MB, four parts)."""
        first, stop = src.rows or (0, self.shapes[src.key][0] if self.shapes[src.key] else 1)
        if not src.swap:
            yield from self.ckpt.row_chunks(src.key, first, stop)
            return
        half = first + (stop - first) // 2
        yield from self.ckpt.row_chunks(src.key, half, stop)
        yield from self.ckpt.row_chunks(src.key, first, half)

    def _rows(self, src: _Src) -> np.ndarray[Any, Any]:
        import numpy as np

        shape = self.shapes[src.key]
        raw = np.frombuffer(self.ckpt.raw_bytes(src.key), dtype=np.uint8).reshape(shape[0] if shape else 1, -1)
        raw = raw if src.rows is None else raw[src.rows[0] : src.rows[1]]
        return np.concatenate([raw[len(raw) // 2 :], raw[: len(raw) // 2]]) if src.swap else raw

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        from ..io.fingerprint_cache import remembered

        sources = self.canonical(modules)
        return remembered("dit-views", self.ckpt.files, [n for n, _ in sources], lambda: self._views(sources))

    def _views(self, sources: list[tuple[str, _Src]]) -> dict[str, str]:
        views = FingerprintViews()
        for name, src in sources:
            views.feed(name, self.tensor(src))
        return views.digests()

    def tensor(self, src: _Src) -> torch.Tensor:
        """One weight in diffusers' terms, as stored (its dtype)."""
        import torch

        from ..io.tensor_bytes import torch_dtype

        dtype = torch_dtype(self.ckpt.info(src.key).dtype)
        return torch.from_numpy(self._rows(src).copy()).view(dtype).reshape(src.shape)

    def write(self, tmp: Path, provenance: dict[str, Any], names: Iterable[str], sink: TensorSink) -> None:
        """The file, or the directory (shards, index, config; a pipeline's other components copied), with the
        tensors `names` merged by `sink` and loractl's provenance in every weights file's metadata."""
        from ._rewrite import rewrite_file

        metadata = {RECORD_KEY: json.dumps(provenance, sort_keys=True)}
        merged = set(names)
        if self.path.is_file():
            rewrite_file(self.ckpt, self.ckpt.files[0], tmp, metadata, merged, sink)
            return
        tmp.mkdir()
        target = tmp / "transformer" if self.pipeline else tmp
        changed = [(c, s) for c in self.encoders.values() for s in c.files if merged & set(c.headers[s].tensors)]
        if self.pipeline:
            _copy_tree(self.path, tmp, skip=[self.ckpt.path, *(s for _, s in changed)])
        target.mkdir(exist_ok=True)
        for extra in self.ckpt.other_files() + _index_files(self.ckpt.path):
            shutil.copyfile(extra, target / extra.name)
        for shard in self.ckpt.files:
            rewrite_file(self.ckpt, shard, target / shard.name, metadata, merged, sink)
        for encoder, shard in changed:  # a text encoder's shard holding merged tensors
            (tmp / shard.relative_to(self.path)).parent.mkdir(parents=True, exist_ok=True)
            rewrite_file(encoder, shard, tmp / shard.relative_to(self.path), metadata, merged, sink)

    def merge_record(self) -> Any:
        header = self.ckpt.headers[self.ckpt.files[0]]
        try:
            return json.loads(header.metadata[RECORD_KEY]) if RECORD_KEY in header.metadata else None
        except ValueError:
            return None  # a damaged record is no evidence


def _index_files(directory: Path) -> list[Path]:
    from ..io.checkpoint import DIFFUSERS_INDEX_NAME, INDEX_NAME

    return [p for n in (INDEX_NAME, DIFFUSERS_INDEX_NAME) if (p := directory / n).is_file()]


def _encoders(pipeline: Path, arch: Arch, taken: set[str]) -> dict[str, Checkpoint]:
    """The pipeline's text encoders (`text_encoder*/`, transformers checkpoints in safetensors) whose tensor names
    neither the transformer nor another encoder holds: a merged tensor is named as stored (SD3's two CLIPs, both
    `text_model.…`, are left out: their modules are refused)."""
    found: dict[str, Checkpoint] = {}
    for component in arch.text_encoders:
        try:
            found[component] = Checkpoint(pipeline / component)
        except (LoractlError, OSError):
            continue  # absent, or not safetensors
    counts: dict[str, int] = {}
    for ckpt in found.values():
        for name in ckpt.names:
            counts[name] = counts.get(name, 0) + 1
    clashing = {c for c, ckpt in found.items() if any(counts[n] > 1 or n in taken for n in ckpt.names)}
    for component in clashing:
        found.pop(component).close()
    return found


def _copy_tree(source: Path, target: Path, skip: list[Path]) -> None:
    """Every file under `source` but those under `skip`, copied (symbolic links followed: a Hub snapshot's)."""
    for path in sorted(source.rglob("*")):
        if any(path == s or s in path.parents for s in skip) or not path.is_file() or path.name.startswith("."):
            continue
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.relative_to(source))


class DitWeights:
    """The transformer as diffusers' checkpoint (`protocol.Weights`, for `extract`): each weight under its name
    in diffusers' terms with `transformer.` (`transformer.transformer_blocks.0.attn.to_q.weight`: a fused
    tensor's rows), the stored tensors no rule names under their own names. `only` keeps the named ones
    (a pair of bases in different layouts compares what both name)."""

    quantized: frozenset[str] = frozenset()

    def __init__(self, base: DitBase, only: set[str] | None = None) -> None:
        self.base, self.path, self.files = base, base.path, base.ckpt.files
        mapped = {f"{COMPONENT}{n}": s for n, s in base.sources.items()}
        covered = {s.key for s in base.sources.values()}
        rest = {k: _Src(k, shape) for k, shape in base.shapes.items() if k not in covered}
        self.sources = {n: s for n, s in (mapped | rest).items() if only is None or n in only}
        self.mapped = set(mapped)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, name: object) -> bool:
        """Also an original module's weight (`transformer.double_blocks.0.img_attn.qkv.weight`), as a merge
        record names it: `touched_weight_names` then finds it, and `fingerprint` takes it in diffusers' terms."""
        if not isinstance(name, str):
            return False
        return name in self.sources or bool(self.base.canonical([name.removesuffix(".weight")]))

    def info(self, name: str) -> TensorInfo:
        src = self.sources[name]
        return self.base.ckpt.view_info(src.key, src.shape)

    def get(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        return self.base.tensor(src) if src.rows or src.swap else self.base.ckpt.get(src.key)

    def config(self) -> dict[str, Any]:
        return {}

    def fingerprint(
        self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False, scheme: str = STREAM
    ) -> str:
        return self.base.fingerprint([n.removesuffix(".weight") for n in names], stop, fresh=fresh, scheme=scheme) or ""

    def merge_record(self) -> Any:
        return self.base.merge_record()


def paired(base: Any, finetuned: Any) -> tuple[Any, Any]:
    """`extract`'s two views when either side is a diffusion transformer: the same architecture on both sides;
    in different layouts, the weights both name in diffusers' terms."""
    if not (isinstance(base, DitWeights) and isinstance(finetuned, DitWeights)):
        raise ShapeMismatchError(
            f"{base.path} and {finetuned.path}: a diffusion transformer pairs only with another of its architecture",
            hint="give two transformers of one model, in either layout (--dry-run shows the plan)",
        )
    arch = {w.base.found.arch.name for w in (base, finetuned)}
    if len(arch) > 1:
        raise ShapeMismatchError(f"{base.path} and {finetuned.path} are different transformers: {sorted(arch)}",
                                 hint="extract from a fine-tune of this very model")  # fmt: skip
    if base.base.found.layout == finetuned.base.found.layout:
        return base, finetuned
    shared = base.mapped & finetuned.mapped
    return DitWeights(base.base, shared), DitWeights(finetuned.base, shared)
