"""Merge adapters into a base rewritten in its own storage: a GGUF model, a single-file SD checkpoint.

The base (`loractl.bases`) places each module on one of its stored tensors and writes itself
under a temporary name: every tensor keeps its name, shape and type (quantized ones are
requantized), tensors no adapter touches keep their bytes, and loractl's provenance goes into
the base's own metadata. Each adapted tensor is read as float32, merged (`merge_kernel`, on
`device`) and handed back to the base to store; its rounding loss is measured on what is stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .._version import __version__
from ..bases import open_base
from ..bases.protocol import RewritableBase
from ..errors import LoractlError, NumericError, UsageError
from ..formats.options import ReadOptions
from ..info import AdapterInfo
from ..io import interrupt
from ..io.atomic import atomic_output, ensure_distinct
from .placement import PlacedMergeReport, PlacedModuleReport, PlacedPlan, module_reports, plan_placements
from .weights import check_weights

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter
    from .merge_shared import MergeProgress
    from .placement import TensorMerge


def open_rewritable(path: str | Path) -> RewritableBase:
    """The GGUF or single-file base at `path` (the caller knows it is one: `bases.detect_base`)."""
    return cast("RewritableBase", open_base(path))


def plan_placed_merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
    imatrix: str | Path | None = None,
) -> PlacedPlan:
    """Place every adapter module on a tensor of the base, from headers only; problems are collected.
    `imatrix` (a GGUF base only) is llama.cpp's importance matrix the quantized tensors it covers are
    requantized with (`--imatrix`)."""
    options = replace(read_options or ReadOptions(), base=None)
    rewritable = open_rewritable(base)
    try:
        _use_imatrix(rewritable, imatrix)
        infos = [_describe(rewritable, a, format, options) for a in adapters]
        plan = plan_placements(rewritable, infos, check_weights(weights, len(adapters)), options)
        return replace(plan, imatrix=None if imatrix is None else str(imatrix))
    finally:
        rewritable.close()


def _use_imatrix(base: RewritableBase, imatrix: str | Path | None) -> None:
    from ..bases.gguf import GgufBase

    if imatrix is None:
        return
    if not isinstance(base, GgufBase):
        raise UsageError("--imatrix applies to GGUF bases (llama.cpp's importance matrix)",
                         hint="drop --imatrix for this base")  # fmt: skip
    base.use_importance(Path(imatrix))


def _files(base: RewritableBase, output: Path) -> tuple[list[Path], list[Path]]:
    """What the merge writes and what it reads: one file each, or one per shard of a split GGUF."""
    from ..bases.gguf import GgufBase

    if isinstance(base, GgufBase):
        return base.output_files(output), base.paths
    return [output], [base.path]


def _write(base: RewritableBase, tmps: list[Path], record: dict[str, Any], names: list[str], sink: _Sink) -> None:
    from ..bases.gguf import GgufBase

    if isinstance(base, GgufBase):
        base.write(tmps[0], record, names, sink, shards=tmps[1:])
    else:
        base.write(tmps[0], record, names, sink)


def execute_placed_merge(
    plan: PlacedPlan,
    output: str | Path,
    *,
    force: bool = False,
    allow_base_mismatch: bool = False,
    progress: Callable[[MergeProgress], None] | None = None,
    device: str = "cpu",
) -> PlacedMergeReport:
    """Write the base with Σ wᵢ·ΔWᵢ merged in to the file `output`; nothing is written on error."""
    from ..formats import load_adapter
    from .devices import resolve_device
    from .merge_shared import check_base_fingerprints

    plan.check()
    options = plan.read_options or ReadOptions()
    base = open_rewritable(plan.base)
    try:
        _use_imatrix(base, plan.imatrix)
        files, read = _files(base, Path(output))
        for file in files:
            ensure_distinct(file, [*read, *plan.adapters])
        loaded = [
            load_adapter(i.path, format=i.format, options=base.read_options(i.format, options)) for i in plan.infos
        ]
        prints = tuple(base.fingerprint(list(i.modules)) for i in plan.infos)
        notes = check_base_fingerprints(base, [(Path(i.path), i) for i in plan.infos], prints, allow_base_mismatch)
        sink = _Sink(plan, loaded, resolve_device(device), progress)
        hashes = tuple(a.content_hash() for a in loaded)
        with ExitStack() as outputs:  # every shard under a temporary name, renamed once all are written
            tmps = [outputs.enter_context(atomic_output(f, force=force)) for f in files]
            _write(base, tmps, _record(plan, hashes, prints), list(plan.updates), sink)
    except OSError as e:
        raise LoractlError(
            f"I/O error: {e.strerror or e}", path=e.filename or output,
            hint="check that the output's directory is writable and the disk has room; nothing was written",
        ) from e  # fmt: skip
    finally:
        base.close()
    copied = plan.tensors_total - len(plan.updates)
    return PlacedMergeReport(str(files[0]), plan, tuple(sink.rows), copied, prints, hashes, notes,
                             tuple(str(f) for f in files))  # fmt: skip


def _describe(base: RewritableBase, path: str | Path, fmt: str | None, options: ReadOptions) -> AdapterInfo:
    from ..formats import describe_adapter, detect_format

    fmt = fmt or detect_format(path)
    return describe_adapter(path, format=fmt, options=base.read_options(fmt, options))


class _Sink:
    """Merges each tensor the base hands over, and keeps the report rows (`bases.TensorSink`)."""

    def __init__(
        self,
        plan: PlacedPlan,
        adapters: list[Adapter],
        device: torch.device,
        progress: Callable[[MergeProgress], None] | None,
    ) -> None:
        self.plan, self.adapters, self.device, self.progress = plan, adapters, device, progress
        self.rows: list[PlacedModuleReport] = []
        self._start: torch.Tensor | None = None  # the tensor being merged, until the base stores it
        self._result: TensorMerge | None = None
        self._done = self._bytes = 0

    def merged(self, name: str, start: torch.Tensor) -> torch.Tensor:
        from .merge_kernel import all_finite
        from .placement import merge_tensor, placed_delta

        interrupt.check()  # Ctrl-C stops the merge at the next tensor, as the checkpoint merge does
        updates = self.plan.updates[name]
        deltas = [placed_delta(self.adapters[u.adapter].modules[u.module], u.weight, u.placement, start.shape[0])
                  for u in updates]  # fmt: skip
        self._result = merge_tensor(start, deltas, self.device)
        if not all_finite(self._result.merged):
            raise NumericError(f"merged tensor {name!r} contains NaN or Inf; nothing was written",
                               hint="check the inputs with 'loractl inspect --stats ADAPTER'")  # fmt: skip
        self._start = start
        return self._result.merged

    def stored(self, name: str, values: torch.Tensor) -> None:
        from .merge_shared import MergeProgress
        from .placement import rounding_error, rounding_loss

        assert self._start is not None and self._result is not None
        tensor, updates = self.plan.stored[name], self.plan.updates[name]
        loss = rounding_loss(self._start, self._result.merged, values, tensor.quantized)
        error = rounding_error(self._start, self._result.merged, values)
        ranks = [self.adapters[u.adapter].modules[u.module].rank for u in updates]
        self.rows += module_reports(name, tensor.stored_type, updates, ranks, self._result, loss, error)
        self._done += 1
        self._bytes += _float32_bytes(tensor.shape)
        if self.progress is not None:
            total = self.plan.stored.values()
            self.progress(
                MergeProgress(name, self._done, len(total), self._bytes, sum(_float32_bytes(t.shape) for t in total))
            )


def _float32_bytes(shape: tuple[int, ...]) -> int:
    """What the progress counts: the tensor's bytes as merged (float32), whatever its stored type."""
    return 4 * math.prod(shape)


def _record(plan: PlacedPlan, hashes: Sequence[str], prints: Sequence[str | None]) -> dict[str, Any]:
    """Provenance for the base's metadata: what was merged, no paths or times (deterministic bytes)."""
    adapters = [
        {"content_hash": h, "format": i.format, "weight": w, "base_fingerprint": fp}
        for h, i, w, fp in zip(hashes, plan.infos, plan.weights, prints, strict=True)
    ]
    return {"op": "merge", "loractl_version": __version__, "layout": plan.kind, "adapters": adapters}
