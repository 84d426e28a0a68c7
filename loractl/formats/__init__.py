"""The format registry: each format offers `detect`, `describe`, `read` and `write`.

Adding a format is one module and one line in `FORMATS`; detection tries them in order.

One naming rule for what lives here: a public name is a format or the options all formats take.
- A format in one file is a module: `diffusers`, `loralib`, `mlx`, `torchtune`.
- A format in several files is a subpackage whose `__init__` holds the verbs and whose modules
  name their job: `gguf/` (`names`, `writer`), `kohya/` (`names`, `lycoris`), `peft/` (`config`, `writer`).
- `options`: `ReadOptions`, `WriteOptions` and `Feature`, which ops and the CLI use too.
- Helpers shared by several formats start with an underscore and stay inside `formats/`:
  `_global_alpha`, `_modules`, `_reading`, `_record`, `_rope`, `_state_dict`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import InputNotFoundError, UnknownFormatError, UsageError
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
    module = _module(path, format)
    info: AdapterInfo = module.describe(adapter_file(Path(path), module.NAME), opts)
    return _with_unusable_modules(info)


def load_adapter(
    path: str | Path, *, format: str | None = None, allow_pickle: bool = False, options: ReadOptions | None = None
) -> Adapter:
    """Read an adapter in any registered format into the canonical model."""
    opts = _read_options(options, allow_pickle)
    module = _module(path, format)
    adapter: Adapter = module.read(adapter_file(Path(path), module.NAME), opts)
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
    opts = options or WriteOptions()
    return FORMATS[format].write(adapter, Path(path), force=force, options=opts)  # type: ignore[no-any-return]


def format_holds(format: str) -> frozenset[Feature]:
    """What `format` can store (its `HOLDS`); everything when the module does not say."""
    holds: frozenset[Feature] = getattr(FORMATS[format], "HOLDS", ALL_FEATURES)
    return holds


def _with_unusable_modules(info: AdapterInfo) -> AdapterInfo:
    """Add an error finding for every module a hostile file left with rank < 1 or a non-finite scale."""
    bad = [
        error("bad-scale", f"rank {m.rank}, scale {m.scale}: not a usable LoRA module", name)
        for name, m in info.modules.items()
        if m.rank < 1 or not math.isfinite(m.scale)
    ]
    return replace(info, findings=(*info.findings, *bad)) if bad else info


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
