"""The format registry: each format offers `detect`, `describe`, `read` and `write`.

Adding a format is one module and one line in `FORMATS`; detection tries them in order.

One naming rule for what lives here: a public name is a format or the options all formats take.
- A format in one file is a module: `diffusers`, `loralib`, `mlx`, `original`, `torchtune`.
- A format in several files is a subpackage whose `__init__` holds the verbs and whose modules
  name their job: `gguf/` (`names`, `writer`), `kohya/` (`names`, `lycoris`), `peft/` (`config`, `writer`).
- `options`: `ReadOptions`, `WriteOptions` and `Feature`, which ops and the CLI use too.
- Helpers shared by several formats start with an underscore and stay inside `formats/`:
  `_contents` (what a file without a LoRA pair holds), `_dit` (diffusion transformers' two layouts), `_global_alpha`, `_mlx_names`, `_modules`,
  `_reading`, `_record`, `_rope`, `_state_dict`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, FormatError, InputNotFoundError, UnknownFormatError, UsageError
from ..findings import error
from ..info import AdapterInfo
from ..io.safetensors_header import damage, is_safetensors, read_header
from .options import ALL_FEATURES, Feature, ReadOptions, WriteOptions

if TYPE_CHECKING:
    from ..adapter import Adapter


class _Registry(Mapping[str, ModuleType]):
    """Format modules by name, imported on first use: a header-only `inspect` loads only the formats it tries."""

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._loaded: dict[str, ModuleType] = {}

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = importlib.import_module(f".{name}", __name__)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# Detection order matters (FORMATS.md §11.2): the first format whose `detect` says yes wins.
FORMATS: Mapping[str, ModuleType] = _Registry(
    [
        "gguf",  # magic bytes first: GGUF adapters, and GGUF models / legacy ggla files refused clearly
        "torchtune",  # before peft: its output dir has a PEFT-style adapter_config.json beside the .pt
        "peft",
        "mlx",
        "diffusers",
        "original",  # diffusion_model.<original module names> (ComfyUI's layout), XLabs' Flux processors
        "kohya",
        "loralib",  # bare *.lora_A keys: last, the loosest pattern
    ]
)


def detect_format(path: str | Path) -> str:
    """The name of the first format that recognises `path`; `UnknownFormatError` with sample keys otherwise."""
    path = Path(path)
    InputNotFoundError.check(path)
    name = _detect(path) or _detect(adapter_file(path))
    if name is not None:
        return name
    damaged = damage(path)
    if damaged is not None:
        raise damaged
    _refuse_safeloras(path)
    raise UnknownFormatError(_unknown_message(path), path=path, hint=_unknown_hint(path))


def adapter_file(path: Path, format: str | None = None) -> Path:
    """The file to read for `path`: a directory that no format reads as a directory but that holds one
    adapter file (an mlx-examples `adapters.npz`, a loralib `.bin`) stands for that file."""
    if not path.is_dir() or (FORMATS[format].detect(path) if format else _detect(path)):
        return path
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in _SINGLE_FILE_SUFFIXES]
    if len(files) == 1 and (FORMATS[format].detect(files[0]) if format else _detect(files[0])):
        return files[0]
    return path


_SINGLE_FILE_SUFFIXES = (".npz", ".bin", ".pt", ".pth", ".safetensors")


def _detect(path: Path) -> str | None:
    return next((name for name, module in FORMATS.items() if module.detect(path)), None)


def _refuse_safeloras(path: Path) -> None:
    """lora_diffusion's numbered modules are named as such, not as an unknown file that `--from` might read."""
    from ._contents import SAFELORAS_HINT, contents, is_safeloras

    keys = _tensor_keys(path)
    if is_safeloras(keys):
        raise UnknownFormatError(
            f"not a LoRA adapter loractl can read: {contents(keys)}", path=path, hint=SAFELORAS_HINT
        )


def _unknown_hint(path: Path) -> str:
    """What to do next: a model checkpoint is an input of `extract`, anything else may need `--from`."""
    if path.is_dir() and (path / "config.json").is_file() and not (path / "adapter_config.json").exists():
        return "this is a model checkpoint, not an adapter: 'loractl extract BASE FINETUNED' makes an adapter from two"
    return f"if it is an adapter, name its format with --from (one of: {', '.join(FORMATS)})"


def describe_adapter(
    path: str | Path, *, format: str | None = None, allow_pickle: bool = False, options: ReadOptions | None = None
) -> AdapterInfo:
    """Describe an adapter from its headers and config (no tensor data)."""
    opts = _read_options(options, allow_pickle)
    module, file = _reader(path, format, opts)
    info: AdapterInfo = module.describe(file, opts)
    if not info.modules and not any(f.severity == "error" and f.code != "unknown-key" for f in info.findings):
        # a broken module's own finding says more than "no LoRA module"; keys of another format do not
        raise _no_module(info.files[-1] if info.files else file, module.NAME, list(info.full_tensors), format)
    return _with_unusable_modules(info)


def load_adapter(
    path: str | Path, *, format: str | None = None, allow_pickle: bool = False, options: ReadOptions | None = None
) -> Adapter:
    """Read an adapter in any registered format into the canonical model."""
    opts = _read_options(options, allow_pickle)
    module, file = _reader(path, format, opts)
    adapter: Adapter = module.read(file, opts)
    if not adapter.modules:
        raise _no_module(file, module.NAME, list(adapter.full_tensors), format)
    adapter.check()  # the reader boundary: whatever the file said, A and B fit and every scale is finite
    return adapter


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    *,
    format: str = "peft",
    force: bool = False,
    options: WriteOptions | None = None,
) -> Path:
    """Write `adapter` atomically in `format`; the record (hash, lineage) goes into the metadata."""
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    if not adapter.modules:
        raise AdapterError("the adapter has no LoRA module: nothing to write", path=path, hint=_NO_MODULE_HINT)
    opts = options or WriteOptions()
    return FORMATS[format].write(adapter, Path(path), force=force, options=opts)  # type: ignore[no-any-return]


def architecture(modules: dict[str, int], *, kohya: bool = False) -> dict[str, Any] | None:
    """The diffusion transformer (Flux.1, …) an adapter's modules (path → input width) adapt, as `inspect` shows
    it: name, the others that name its modules alike, layout (`diffusers` or `original` names), blocks adapted per
    kind, text encoders; None for others. `kohya`: the names were read from a kohya file, whose `_` may stand for `.`."""
    from ._dit import describe_architecture

    return describe_architecture(modules, kohya=kohya)


def in_layout(adapter: Adapter, format: str) -> Adapter:
    """`adapter` with its diffusion-transformer modules (Flux) named as `format` writes them: diffusers' split
    q/k/v or the original fused projections (exact both ways; `_dit`). Other adapters come back unchanged."""
    layout = getattr(FORMATS[format], "LAYOUT", None)
    if layout is None:
        return adapter
    from ._dit import relayout

    return relayout(adapter, layout)


def format_fills(format: str) -> frozenset[str]:
    """Which of `alpha`, `scale` files of `format` may lack, to be filled from the options (its `FILLS`)."""
    fills: frozenset[str] = getattr(FORMATS[format], "FILLS", frozenset())
    return fills


def _check_fills(module: ModuleType, options: ReadOptions, file: Path) -> None:
    """`--alpha`/`--scale` for a format that always records its own: refused, never silently ignored."""
    for name, value in (("alpha", options.alpha), ("scale", options.scale)):
        if value is not None and name not in format_fills(module.NAME):
            takers = ", ".join(f for f in FORMATS if name in format_fills(f))
            raise UsageError(
                f"--{name} {value:g} given, but {module.NAME} adapters record their own {name}",
                path=file,
                hint=f"--{name} fills only what a file lacks ({takers}): drop it, or give it for another input "
                f"only as --{name} PATH={value:g}",
            )


def format_holds(format: str) -> frozenset[Feature]:
    """What `format` can store (its `HOLDS`); everything when the module does not say."""
    holds: frozenset[Feature] = getattr(FORMATS[format], "HOLDS", ALL_FEATURES)
    return holds


def format_keeps_full(format: str, key: str) -> bool:
    """Whether `format` holds the full tensor `key` (as named in its layout, `in_layout`): all of them where it
    holds `full_tensors`, else those its `keeps_full` names (diffusers: a Flux control LoRA's norm scales)."""
    if "full_tensors" in format_holds(format):
        return True
    keeps = getattr(FORMATS[format], "keeps_full", None)
    return bool(keeps is not None and keeps(key))


_NO_MODULE_HINT = "an adapter needs at least one LoRA module: an A and a B factor of the same rank"


def _no_module(file: Path, format: str, full_tensors: list[str], forced: str | None) -> FormatError:
    """No LoRA module in `file` read as `format`: say what the file holds instead."""
    from ._contents import contents

    keys = _tensor_keys(file) or full_tensors
    hint = (
        f"it is not a {forced} adapter: without --from loractl detects the format, or names what it holds"
        if forced
        else _NO_MODULE_HINT
    )
    return FormatError(f"no LoRA module read as {format}: the file holds {contents(keys)}", path=file, hint=hint)


def _tensor_keys(file: Path) -> list[str]:
    """The tensor keys of a safetensors file; [] for anything else (pickles name theirs once loaded)."""
    if file.is_dir():
        file = next((f for f in sorted(file.glob("*.safetensors")) if f.is_file()), file)
    try:
        return list(read_header(file).tensors) if is_safetensors(file) else []
    except FormatError:
        return []


def _with_unusable_modules(info: AdapterInfo) -> AdapterInfo:
    """Add an error finding for every module a hostile file left with rank < 1 or a non-finite scale."""
    bad = [
        error("bad-scale", f"rank {m.rank}, scale {m.scale}: not a usable LoRA module", name)
        for name, m in info.modules.items()
        if m.rank < 1 or not math.isfinite(m.scale)
    ]
    return replace(info, findings=(*info.findings, *bad)) if bad else info


def _reader(path: str | Path, format: str | None, opts: ReadOptions) -> tuple[ModuleType, Path]:
    """The format module that reads `path` and the file it reads, with `opts` checked against it first."""
    module = _module(path, format)
    file = adapter_file(Path(path), module.NAME)
    _refuse_safeloras(file)
    _check_fills(module, opts, file)
    return module, file


def _read_options(options: ReadOptions | None, allow_pickle: bool) -> ReadOptions:
    if options is None:
        return ReadOptions(allow_pickle=allow_pickle)
    return replace(options, allow_pickle=True) if allow_pickle else options


def check_format(name: str, role: str = "") -> None:
    """Refuse a format name no module reads or writes (`--from`, `--to`; `role` "target " says which)."""
    if name not in FORMATS:
        raise UsageError(f"unknown {role}format {name!r}", hint=f"choose one of: {', '.join(FORMATS)}")


def _module(path: str | Path, format: str | None) -> ModuleType:
    if format is None:
        return FORMATS[detect_format(path)]
    check_format(format)
    InputNotFoundError.check(path)
    return FORMATS[format]


def _unknown_message(path: Path) -> str:
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir())[:5]
        return f"not a LoRA adapter this version knows (files: {', '.join(files) or 'none'})"
    if is_safetensors(path):
        try:
            keys = list(read_header(path).tensors)[:5]
        except Exception:
            keys = []
        return f"not a LoRA adapter this version knows (keys: {', '.join(keys) or 'none'})"
    return "not a LoRA adapter file (not safetensors, and no adapter_config.json beside it)"
