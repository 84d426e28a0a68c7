"""Merge adapters into a base rewritten in its own storage: a GGUF model, a single-file SD checkpoint.

The base (`loractl.bases`) places each module on one of its stored tensors and writes itself
under a temporary name: every tensor keeps its name, shape and type (quantized ones are
requantized), tensors no adapter touches keep their bytes, and loractl's provenance goes into
the base's own metadata. Each adapted tensor is read, merged (`merge_kernel`, on `device`) and handed
back to the base to store a block of rows at a time (`bases.TensorSink`), so memory does not grow with
the tensor; its rounding loss is summed over the blocks, measured on what is stored.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._version import __version__
from ..bases.protocol import RewritableBase, RowsOf
from ..errors import NumericError
from ..formats.options import ReadOptions
from ..io import interrupt
from ..io.atomic import atomic_output, ensure_distinct, io_errors
from .merge_placed_plan import PlacedPlan, PlacedUpdate, open_rewritable, use_imatrix
from .merge_report import MergedModule, MergeReport

T = TypeVar("T")
WORKERS = 2  # pool threads merging blocks and taking their figures, beside the reading and storing one
BLOCK = 1 << 18  # float32 elements per row block (1 MB): 2 MB blocks were faster, but peaked past 512 MiB
AHEAD = 1  # blocks merged (or figured) ahead of the one being stored: memory is a few blocks

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter, LoraModule
    from .merge_kernel import Delta
    from .merge_placed_plan import TensorFigures
    from .merge_shared import MergeProgress


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
    plan: PlacedPlan, output: str | Path, force: bool, allow_mismatch: bool,
    progress: Callable[[MergeProgress], None] | None, device: str,
) -> MergeReport:  # fmt: skip
    """`merge.execute_merge` for a placed plan: the base with Σ wᵢ·ΔWᵢ merged in, written to the file
    `output`; nothing is written on error."""
    from ..formats import load_adapter
    from .devices import resolve_device
    from .merge_kernel import kernel_threads, steady_heap
    from .merge_shared import check_base_fingerprints

    plan.check()
    options = plan.read_options or ReadOptions()
    base = open_rewritable(plan.base, plan.output)
    with closing(base), io_errors(output):
        use_imatrix(base, plan.imatrix)
        files, read = _files(base, Path(output))
        for file in files:
            ensure_distinct(file, [*read, *plan.adapters])
        loaded = [
            load_adapter(i.path, format=i.format, options=base.read_options(i.format, options)) for i in plan.infos
        ]
        prints = tuple(base.fingerprint(list(i.modules)) for i in plan.infos)
        notes = check_base_fingerprints(base, [(Path(i.path), i) for i in plan.infos], prints, allow_mismatch)
        hashes = tuple(a.content_hash() for a in loaded)
        with ExitStack() as outputs:  # every shard under a temporary name, renamed once all are written
            outputs.enter_context(kernel_threads())  # one torch thread per op, as the checkpoint merge (`merge_kernel`)
            pool = outputs.enter_context(ThreadPoolExecutor(WORKERS, thread_name_prefix="loractl-merge"))
            sink = _Sink(plan, loaded, resolve_device(device), progress, pool)
            steady_heap()  # block temporaries never from a fragmenting heap
            tmps = [outputs.enter_context(atomic_output(f, force=force)) for f in files]
            _write(base, tmps, _record(plan, hashes, prints), list(plan.updates), sink)
    merged = len(plan.updates)
    return MergeReport(files[0], plan, tuple(sink.rows), prints, hashes, tensors_checked=merged,
                       tensors_copied=plan.tensors_total - merged - plan.tensors_converted,
                       shards=tuple(str(f) for f in files) if len(files) > 1 else (),
                       base_notes=notes)  # fmt: skip


class _Sink:
    """Merges each tensor the base hands over, a block of rows at a time, and keeps the report rows
    (`bases.TensorSink`)."""

    def __init__(
        self,
        plan: PlacedPlan,
        adapters: list[Adapter],
        device: torch.device,
        progress: Callable[[MergeProgress], None] | None,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.plan, self.adapters, self.device, self.progress = plan, adapters, device, progress
        self.pool, self._buffers = pool, _Buffers()
        self._uses = Counter((u.adapter, u.module) for us in plan.updates.values() for u in us)
        self.rows: list[MergedModule] = []
        self._done = self._bytes = 0

    @property
    def block_elements(self) -> int:
        return BLOCK  # read when called: the row-block tests lower it

    def blocks(
        self,
        name: str,
        rows_of: RowsOf,
        store: Callable[[int, torch.Tensor], tuple[T, torch.Tensor]],
        multiple: int = 1,
    ) -> Iterator[T]:
        import torch

        from .merge_io import matrix_shape
        from .merge_kernel import aligned_bounds, deltas_norm, on_device
        from .merge_placed_plan import BlockFigures, TensorFigures, block_figures, placed_delta

        interrupt.check()  # Ctrl-C stops the merge at the next tensor, as the checkpoint merge does
        tensor, updates = self.plan.stored[name], self.plan.updates[name]
        rows, cols = matrix_shape(tensor.shape)
        deltas = [placed_delta(self.adapters[u.adapter].modules[u.module], u.weight, u.placement, rows)
                  for u in updates]  # fmt: skip
        figures = TensorFigures(tuple(deltas_norm([d]) for d in deltas))
        whole = any(d.magnitude is not None and d.per_column for d in deltas)
        moved = on_device(deltas, self.device)
        # read and store here (a base's reader and encoder need not be thread-safe); merge and figures
        # on the pool, `AHEAD` blocks ahead, in buffers reused from block to block; figures summed in row order
        merging: deque[tuple[int, Future[_Merged]]] = deque()
        figuring: deque[tuple[Future[BlockFigures], torch.Tensor | None]] = deque()

        def settle(keep: int) -> None:
            while figuring and (figuring[0][0].done() or len(figuring) > keep):
                job, buffers = figuring.popleft()
                figures.add(job.result())
                if buffers is not None:
                    self._buffers.give(buffers)

        def stored(start: int, job: Future[_Merged]) -> T:
            m = job.result()
            out, values = store(start, m.merged)
            if values is m.merged:
                back = None
            elif values.dtype == torch.float32:
                back = values
            else:  # a float32 copy now: `values` may live in a write buffer that is reused once written
                back = m.buffers[2].view(-1)[: m.start.numel()].view(m.start.shape).copy_(values.reshape(m.start.shape))
            figuring.append((self.pool.submit(block_figures, m.start, m.delta, m.weight_sq, m.delta_sq, back,
                                              tensor.quantized), None if back is None else m.buffers))  # fmt: skip
            settle(AHEAD)
            return out

        for start, stop in pairwise(aligned_bounds(rows, cols, multiple, whole, BLOCK)):
            interrupt.check()
            w = rows_of(start, stop)
            job = self.pool.submit(_merge_block, name, w, self._buffers.take(w.numel()), moved, start, self.device)
            merging.append((start, job))
            if len(merging) > AHEAD:
                yield stored(*merging.popleft())
        while merging:
            yield stored(*merging.popleft())
        settle(0)
        modules = [self.adapters[u.adapter].modules[u.module] for u in updates]
        self.rows += _module_rows(name, tensor.stored_type, updates, modules, figures, tensor.quantized)
        self._release(updates)
        self._done += 1
        self._bytes += _float32_bytes(tensor.shape)
        if self.progress is not None:
            from .merge_shared import MergeProgress

            total = self.plan.stored.values()
            self.progress(
                MergeProgress(name, self._done, len(total), self._bytes, sum(_float32_bytes(t.shape) for t in total))
            )

    def _release(self, updates: Sequence[PlacedUpdate]) -> None:
        """Drop the factors of each module whose last tensor is merged (kept as shapes): the adapter's memory
        shrinks as the merge goes, rather than all of it staying beside the blocks to the end."""
        for u in updates:
            self._uses[u.adapter, u.module] -= 1
            if self._uses[u.adapter, u.module] == 0:
                modules = self.adapters[u.adapter].modules
                m = modules[u.module]
                modules[u.module] = replace(m, A=m.A.to("meta"), B=m.B.to("meta"))


@dataclass(frozen=True)
class _Merged:
    """One block of rows merged: W + ΔW (the block's shape), and as (rows, cols) float32 W and ΔW = merged − W
    (in `buffers`, with their squared norms)."""

    merged: torch.Tensor
    start: torch.Tensor
    delta: torch.Tensor
    weight_sq: float
    delta_sq: float
    buffers: torch.Tensor


class _Buffers:
    """Float32 buffers of 4 × `BLOCK` for the blocks in flight (W, ΔW, what is stored, W + ΔW), reused: a fresh
    allocation costs a page fault for every 4 KB of it, and heap ones from several threads fragment the heap.
    A store that hands back W + ΔW itself as what it stores (a float32 cast) may still be writing it: those
    buffers are not reused. Main thread only."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int) -> torch.Tensor:
        import torch

        if numel > BLOCK:  # a block of a few very long rows, a whole tensor (DoRA over columns)
            return torch.empty(4, numel)
        return self._free.pop() if self._free else torch.empty(4, BLOCK)

    def give(self, buffers: torch.Tensor) -> None:
        if buffers.shape[1] == BLOCK:
            self._free.append(buffers)


def _merge_block(
    name: str, w: torch.Tensor, buffers: torch.Tensor, deltas: Sequence[Delta], start: int, device: torch.device
) -> _Merged:
    """W + ΔW of one block of rows `w` (any float dtype), on a pool thread; raises on NaN or Inf in it."""
    import torch

    from .merge_kernel import all_finite, merge_rows, rows_sq

    rows = w.shape[0] if w.ndim else 1
    before, delta, _, merged = (b[: w.numel()].view(rows, -1) for b in buffers)
    before.copy_(w.reshape(rows, -1))
    weight_sq = rows_sq(before)
    merged = merge_rows(merged.copy_(before).view(w.shape), deltas, start, device)  # in place on the CPU
    torch.sub(merged.reshape(before.shape), before, out=delta)
    delta_sq = rows_sq(delta)
    # NaN or Inf in W + ΔW (a float32 row norm can also overflow): checked before the base stores it
    if not math.isfinite(delta_sq) and not (all_finite(merged) and all_finite(before)):
        raise NumericError(f"merged tensor {name!r} contains NaN or Inf; nothing was written",
                           hint="check the inputs with 'loractl inspect --stats ADAPTER'")  # fmt: skip
    return _Merged(merged, before, delta, weight_sq, delta_sq, buffers)


def _module_rows(
    key: str,
    stored_type: str,
    updates: Sequence[PlacedUpdate],
    modules: Sequence[LoraModule],
    figures: TensorFigures,
    quantized: bool,
) -> list[MergedModule]:
    """The report rows of one merged tensor: the loss and error are the tensor's, shared by its updates."""
    base, loss, error = figures.base_norm, figures.rounding_loss(quantized), figures.rounding_error()
    return [
        MergedModule(u.adapter, u.module, key, "lora" if m.magnitude is None else "dora", stored_type, u.weight,
                     m.scale, m.rank, d / base if base > 0 else None, loss, error)
        for u, m, d in zip(updates, modules, figures.delta_norms, strict=True)
    ]  # fmt: skip


def _float32_bytes(shape: tuple[int, ...]) -> int:
    """What the progress counts: the tensor's bytes as merged (float32), whatever its stored type."""
    return 4 * math.prod(shape)


def _record(plan: PlacedPlan, hashes: Sequence[str], prints: Sequence[str | None]) -> dict[str, Any]:
    """Provenance for the base's metadata: what was merged, no paths or times (deterministic bytes)."""
    adapters = [
        {"content_hash": h, "format": i.format, "weight": w, "base_fingerprint": fp}
        for h, i, w, fp in zip(hashes, plan.infos, plan.weights, prints, strict=True)
    ]
    modules = sorted({(u.adapter, u.module) for us in plan.updates.values() for u in us})
    return {
        "op": "merge", "loractl_version": __version__, "layout": plan.kind, "adapters": adapters,
        "modules": [{"adapter": i, "module": m} for i, m in modules],  # what `extract` checks a swapped pair by
    }  # fmt: skip
