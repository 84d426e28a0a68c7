"""Merge adapters into a llama.cpp GGUF model (the job of llama.cpp's `export-lora`), streaming.

The output has the base's header byte for byte: every tensor keeps its name, shape and type, so
every offset stays valid. The file is copied as it is, then each adapted tensor is dequantized,
merged in float32 (`merge_kernel`), requantized to its own type and written over its old bytes;
tensors no adapter touches are never decoded. All under a temporary name, renamed at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import LoractlError, NumericError
from ..formats.gguf.model import GgufBase, adapter_architecture
from ..formats.options import ReadOptions
from ..info import AdapterInfo
from ..io.atomic import atomic_output, ensure_distinct
from .placement import PlacedMergeReport, PlacedModuleReport, PlacedPlan, module_reports, plan_placements
from .weights import check_weights

if TYPE_CHECKING:
    from ..adapter import Adapter


def plan_gguf_merge(base: str | Path, adapters: Sequence[str | Path], *, weights: Sequence[float] | None = None,
                    allow_pickle: bool = False) -> PlacedPlan:  # fmt: skip
    """Place every adapter module on a tensor of the GGUF model, from headers only; problems are collected."""
    gguf = GgufBase(base)
    infos = [_describe(a, gguf, allow_pickle) for a in adapters]
    return _plan(gguf, infos, check_weights(weights, len(adapters)))


def merge_gguf(
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    track: Callable[[Iterable[str], int], Iterable[str]] | None = None,
) -> PlacedMergeReport:
    """Write the GGUF model `base` with Σ wᵢ·ΔWᵢ merged in, to the file `output`; nothing is written on error."""
    gguf = GgufBase(base)
    infos = [_describe(a, gguf, allow_pickle) for a in adapters]
    plan = _plan(gguf, infos, check_weights(weights, len(adapters)))
    plan.check()
    ensure_distinct(output, [base, *adapters])
    loaded = [_load(a, i.format, gguf, allow_pickle) for a, i in zip(adapters, infos, strict=True)]
    try:
        with atomic_output(output, force=force) as tmp:
            shutil.copyfile(gguf.path, tmp)
            with tmp.open("r+b") as f:
                keys = track(plan.updates, len(plan.updates)) if track else plan.updates
                modules = [row for key in keys for row in _merge_tensor(gguf, plan, key, loaded, f)]
    except OSError as e:
        raise LoractlError(
            f"I/O error: {e.strerror or e}", path=e.filename or output,
            hint="check that the output's directory is writable and the disk has room; nothing was written",
        ) from e  # fmt: skip
    return PlacedMergeReport(str(output), plan, tuple(modules), plan.tensors_total - len(plan.updates))


def _plan(gguf: GgufBase, infos: list[AdapterInfo], weights: list[float]) -> PlacedPlan:
    shapes = {k: gguf.shape(k) for k in gguf.tensors}
    archs = [adapter_architecture(i.config, i.format) for i in infos]
    return plan_placements(
        str(gguf.path), f"gguf {gguf.arch}", infos, weights, lambda i, m, mi: gguf.place(m, mi, archs[i]), shapes
    )


def _describe(path: str | Path, gguf: GgufBase, allow_pickle: bool) -> AdapterInfo:
    from ..formats import describe_adapter, detect_format

    fmt = detect_format(path)
    with _options(fmt, gguf) as options:
        return describe_adapter(path, format=fmt, allow_pickle=allow_pickle, options=options)


def _load(path: str | Path, fmt: str, gguf: GgufBase, allow_pickle: bool) -> Adapter:
    from ..formats import load_adapter

    with _options(fmt, gguf) as options:
        return load_adapter(path, format=fmt, allow_pickle=allow_pickle, options=options)


@contextmanager
def _options(fmt: str, gguf: GgufBase) -> Iterator[ReadOptions]:
    """ReadOptions for an adapter merged into `gguf`: a GGUF adapter gets the base's head counts."""
    if fmt != "gguf":
        yield ReadOptions()
        return
    with tempfile.TemporaryDirectory(prefix="loractl-gguf-") as tmp:
        yield ReadOptions(base=gguf.write_config(Path(tmp)))


def _merge_tensor(
    gguf: GgufBase, plan: PlacedPlan, key: str, adapters: list[Adapter], f: BinaryIO
) -> list[PlacedModuleReport]:
    from .merge_kernel import all_finite
    from .placement import merge_tensor, placed_delta, rounding_loss

    updates = plan.updates[key]
    start = gguf.read_float32(key)
    deltas = [placed_delta(adapters[u.adapter].modules[u.module], u.weight, u.placement, start.shape[0])
              for u in updates]  # fmt: skip
    result = merge_tensor(start, deltas)
    if not all_finite(result.merged):
        raise NumericError(f"merged tensor {key!r} contains NaN or Inf; nothing was written",
                           hint="check the inputs with 'loractl inspect --stats ADAPTER'")  # fmt: skip
    raw, stored = gguf.encode(key, result.merged)
    f.seek(gguf.offset(key))
    f.write(raw)
    loss = rounding_loss(result.merged, stored, result.total_delta_norm)
    ranks = [adapters[u.adapter].modules[u.module].rank for u in updates]
    return module_reports(key, gguf.type_name(key), updates, ranks, result, loss)
