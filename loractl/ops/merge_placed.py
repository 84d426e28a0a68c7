"""Merge adapters into a base rewritten in its own storage: a GGUF model, a single-file SD checkpoint.

The base (`loractl.bases`) places each module on one of its stored tensors and writes itself
under a temporary name: every tensor keeps its name, shape and type (quantized ones are
requantized), tensors no adapter touches keep their bytes, and loractl's provenance goes into
the base's own metadata. Each adapted tensor is read, merged (`merge_kernel`, on `device`) and handed
back to the base to store a block of rows at a time (`bases.TensorSink`), so memory does not grow with
the tensor; its rounding loss is summed over the blocks, measured on what is stored.

The base fingerprint in the record is hashed on a thread beside the merge (GBs of SHA-256), not before it: the
header goes out with a placeholder and the digest is written over it before the output is committed
(`bases.placeholders`). It is taken tensor by tensor in the order the base stores them (`io.checkpoint.PER_TENSOR`),
the merge's own order, and a stored tensor only once the merge has started on it (`io.read_pace`): the two read
each tensor together, so the disk serves its bytes once even where the base is larger than the free memory.
Only an adapter that records its base has it hashed first (by its record's definition), to refuse a wrong base
before a byte is written.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._version import __version__
from ..bases import placeholders
from ..bases.protocol import CastRows, RewritableBase, RowsOf
from ..errors import NumericError
from ..formats.options import ReadOptions
from ..io import interrupt
from ..io.atomic import atomic_output, ensure_distinct, io_errors
from ..io.checkpoint import PER_TENSOR
from ..io.read_pace import ReadPace, paced
from .merge_placed_plan import PlacedPlan, PlacedUpdate, open_rewritable, use_imatrix
from .merge_report import MergedModule, MergeReport
from .merge_shared import check_base_fingerprints, record_scheme, recorded_fingerprint

T = TypeVar("T")
WORKERS = 2  # pool threads merging blocks and taking their figures, beside the reading and storing one
BLOCK = 1 << 19  # float32 elements per row block (2 MB): fewer Python steps than 1 MB (Flux.1-dev: 13% less CPU)
AHEAD = 1  # blocks merged (or figured) ahead of the one being stored: memory is a few blocks
IN_FLIGHT = 3 * WORKERS  # blocks read, merged and stored ahead of the one yielded, where the base allows it (`into`)

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter, LoraModule
    from .merge_kernel import Delta
    from .merge_placed_plan import BlockFigures, TensorFigures
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
        prints = _fingerprints_due(base, plan)
        notes = check_base_fingerprints(base, [(Path(i.path), i) for i in plan.infos], prints, allow_mismatch)
        hashes = tuple(a.content_hash() for a in loaded)
        stop_hash, pace = threading.Event(), ReadPace()
        with ExitStack() as outputs:  # every shard under a temporary name, renamed once all are written
            aside = outputs.enter_context(ThreadPoolExecutor(1, thread_name_prefix="fingerprint"))
            outputs.callback(stop_hash.set)  # a failure does not wait for the rest of the hash
            outputs.callback(pace.release)
            late = {k: placeholders.token() for k, fp in enumerate(prints) if fp == ""}
            hashing = aside.submit(_late_fingerprints, plan, sorted(late), stop_hash, pace)
            outputs.enter_context(kernel_threads())  # one torch thread per op, as the checkpoint merge (`merge_kernel`)
            pool = outputs.enter_context(ThreadPoolExecutor(WORKERS, thread_name_prefix="loractl-merge"))
            sink = _Sink(plan, loaded, resolve_device(device), progress, pool, pace)
            steady_heap()  # block temporaries never from a fragmenting heap
            tmps = [outputs.enter_context(atomic_output(f, force=force)) for f in files]
            written = tuple(PER_TENSOR + late[k] if k in late else fp for k, fp in enumerate(prints))
            _write(base, tmps, _record(plan, hashes, written), list(plan.updates), sink)
            pace.release()  # what the hash still waits for, the merge will not read now
            hashed = hashing.result()
            placeholders.fill(tmps, {late[k]: _digest(fp) for k, fp in hashed.items()})
            prints = tuple(hashed.get(k, fp) for k, fp in enumerate(prints))
    merged = len(plan.updates)
    return MergeReport(files[0], plan, tuple(sink.rows), prints, hashes, tensors_checked=merged,
                       tensors_copied=plan.tensors_total - merged - plan.tensors_converted,
                       shards=tuple(str(f) for f in files) if len(files) > 1 else (),
                       base_notes=notes)  # fmt: skip


def _fingerprints_due(base: RewritableBase, plan: PlacedPlan) -> tuple[str | None, ...]:
    """Per adapter, its base fingerprint where it is due before a byte is written (the adapter records one to check)
    or costs nothing (remembered, or None where the stored values cannot say); '' where it is to be hashed beside
    the merge (`_late_fingerprints`) and written into the record last (`bases.placeholders`)."""
    return tuple(
        base.fingerprint(
            list(i.modules), None if recorded_fingerprint(i) else _remembered_only, scheme=record_scheme(i)
        )
        for i in plan.infos
    )


def _remembered_only() -> bool:
    """A fingerprint's `stop` that abandons the hash before it reads a byte: what is remembered, or ''."""
    return True


def _late_fingerprints(plan: PlacedPlan, adapters: list[int], stop: threading.Event, pace: ReadPace) -> dict[int, str]:
    """The fingerprints `_fingerprints_due` left for later, hashed on a thread beside the merge (a base of its
    own: its own file handles), each stored tensor once the merge has started on it (`io.read_pace`); abandoned
    once `stop` is set (the merge failed)."""
    if not adapters:
        return {}
    with closing(open_rewritable(plan.base, plan.output)) as base, paced(pace):
        return {
            k: base.fingerprint(list(plan.infos[k].modules), stop.is_set, scheme=PER_TENSOR) or "" for k in adapters
        }


def _digest(fingerprint: str) -> str:
    """The hex digits a placeholder stands for (`PER_TENSOR` + 64 of them)."""
    if not fingerprint.startswith(PER_TENSOR) or len(fingerprint) != len(PER_TENSOR) + placeholders.TOKEN_LENGTH:
        raise RuntimeError(f"a base fingerprint of an unexpected form: {fingerprint[:20]!r}")
    return fingerprint[len(PER_TENSOR) :]


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
        pace: ReadPace,
    ) -> None:
        self.plan, self.adapters, self.device, self.progress = plan, adapters, device, progress
        self.pool, self.pace, self._buffers = pool, pace, _Buffers()
        self._uses = Counter((u.adapter, u.module) for us in plan.updates.values() for u in us)
        self.rows: list[MergedModule] = []
        self._done = self._bytes = 0

    @property
    def block_elements(self) -> int:
        return BLOCK  # read when called: the row-block tests lower it

    @property
    def blocks_in_flight(self) -> int:
        return IN_FLIGHT

    def blocks(
        self,
        name: str,
        rows_of: RowsOf,
        store: Callable[[int, torch.Tensor], tuple[T, torch.Tensor]],
        multiple: int = 1,
        into: CastRows[T] | None = None,
    ) -> Iterator[T]:
        from ..io.safetensors_header import DTYPE_SIZES
        from .merge_io import matrix_shape
        from .merge_kernel import aligned_bounds, deltas_norm, on_device
        from .merge_placed_plan import TensorFigures, placed_delta

        interrupt.check()  # Ctrl-C stops the merge at the next tensor, as the checkpoint merge does
        self.pace.started(name)  # the fingerprint's hash may read it now (`io.read_pace`)
        tensor, updates = self.plan.stored[name], self.plan.updates[name]
        rows, cols = matrix_shape(tensor.shape)
        deltas = [placed_delta(self.adapters[u.adapter].modules[u.module], u.weight, u.placement, rows)
                  for u in updates]  # fmt: skip
        figures = TensorFigures(tuple(deltas_norm([d]) for d in deltas))
        whole = any(d.magnitude is not None and d.per_column for d in deltas)
        itemsize = DTYPE_SIZES.get(tensor.stored_type, 8)  # a safetensors type's (GGUF bases read no raw rows)
        block = _Block(name, cols, itemsize, on_device(deltas, self.device), self.device, tensor.quantized)
        bounds = list(pairwise(aligned_bounds(rows, cols, multiple, whole, BLOCK)))
        if into is None:
            yield from self._staged(block, bounds, rows_of, store, figures)
        else:
            yield from self._concurrent(block, bounds, into, figures)
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

    def _concurrent(
        self,
        block: _Block,
        bounds: list[tuple[int, int]],
        into: CastRows[T],
        figures: TensorFigures,
    ) -> Iterator[T]:
        """Each block read, merged, cast into its target and figured on a pool thread, up to `IN_FLIGHT` at a time
        (a pool thread never waits for this one to take a result; under load it can wake late); yielded in row
        order."""
        jobs: deque[tuple[Future[tuple[T, BlockFigures]], torch.Tensor]] = deque()

        def done() -> T:
            job, buffers = jobs.popleft()
            out, figured = job.result()
            figures.add(figured)
            self._buffers.give(buffers)
            return out

        try:
            for start, stop in bounds:
                interrupt.check()
                buffers = self._buffers.take((stop - start) * block.cols, block.quantized)
                jobs.append((self.pool.submit(block.whole, start, stop, into, buffers), buffers))
                if len(jobs) >= IN_FLIGHT:
                    yield done()
            while jobs:
                yield done()
        finally:  # after an error: no job left running on buffers (or a write queue) the caller lets go
            for job, _ in jobs:
                job.cancel()
            wait([job for job, _ in jobs])

    def _staged(
        self,
        block: _Block,
        bounds: list[tuple[int, int]],
        rows_of: RowsOf,
        store: Callable[[int, torch.Tensor], tuple[T, torch.Tensor]],
        figures: TensorFigures,
    ) -> Iterator[T]:
        """Read and store here (a base's reader and encoder need not be thread-safe); merge and figures on the
        pool, `AHEAD` blocks ahead, in buffers reused from block to block; figures summed in row order."""
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
            back = m.stored(values)  # a float32 copy now: `values` may live in a write buffer reused once written
            figuring.append((self.pool.submit(m.figures, back, block.quantized), None if back is None else m.buffers))
            settle(AHEAD)
            return out

        for start, stop in bounds:
            interrupt.check()
            w = rows_of(start, stop)
            job = self.pool.submit(block.merge, w, self._buffers.take(w.numel(), block.quantized), start)
            merging.append((start, job))
            if len(merging) > AHEAD:
                yield stored(*merging.popleft())
        while merging:
            yield stored(*merging.popleft())
        settle(0)

    def _release(self, updates: Sequence[PlacedUpdate]) -> None:
        """Drop the factors of each module whose last tensor is merged (kept as shapes): the adapter's memory
        shrinks as the merge goes, rather than all of it staying beside the blocks to the end."""
        from .merge_kernel import trim_heap

        for u in updates:
            self._uses[u.adapter, u.module] -= 1
            if self._uses[u.adapter, u.module] == 0:
                modules = self.adapters[u.adapter].modules
                m = modules[u.module]
                modules[u.module] = replace(m, A=m.A.to("meta"), B=m.B.to("meta"))
        trim_heap()  # once a tensor: the pages freed between allocations in use go back to the system


@dataclass(frozen=True)
class _Block:
    """How the blocks of one tensor are merged: its deltas (on `device`) and whether its type is block-quantized."""

    name: str
    cols: int
    itemsize: int  # of the stored type, as read
    deltas: Sequence[Delta]
    device: torch.device
    quantized: bool

    def merge(self, w: torch.Tensor, buffers: torch.Tensor, start: int) -> _Merged:
        """W + ΔW of one block of rows `w` (any float dtype), on a pool thread; raises on NaN or Inf in it."""
        import torch

        from . import merge_kernel as kernel

        rows = w.shape[0] if w.ndim else 1
        merged, before, *spare = (b[: w.numel()].view(rows, -1) for b in buffers[1:])
        merged.copy_(w.reshape(rows, -1))
        weight_sq = kernel.rows_sq(merged)
        before.copy_(w.reshape(rows, -1))  # converted again: half the bytes of a float32 copy when `w` is 16-bit
        merged = kernel.merge_rows(merged.view(w.shape), self.deltas, start, self.device)  # in place on the CPU
        # ΔW over W where only ‖stored − merged‖ is wanted (a float type): W is needed again only when quantized
        delta = torch.sub(merged.reshape(before.shape), before, out=spare[0] if self.quantized else before)
        delta_sq = kernel.rows_sq(delta)
        # NaN or Inf in W + ΔW (a float32 row norm can also overflow): checked before the base stores it
        if not math.isfinite(delta_sq) and not kernel.all_finite(merged):
            raise self.non_finite()
        return _Merged(merged, before, delta, weight_sq, delta_sq, buffers)

    def whole(self, start: int, stop: int, into: CastRows[T], buffers: torch.Tensor) -> tuple[T, BlockFigures]:
        """One block read (into `buffers`' first row), merged, cast into its target and figured, on a pool thread."""
        import torch

        raw, nbytes = buffers[0].view(torch.uint8), (stop - start) * self.cols * self.itemsize
        w = into.read(start, stop, raw if nbytes <= raw.numel() else torch.empty(nbytes, dtype=torch.uint8))
        out, target = into.target(start, (stop - start) * self.cols)
        return out, self.cast(w.reshape(stop - start, -1), target.view(stop - start, -1), buffers, start)

    def cast(self, w: torch.Tensor, target: torch.Tensor, buffers: torch.Tensor, start: int) -> BlockFigures:
        """`merge` of rows `w` (as (rows, cols)) cast straight into `target` (the store's buffer, a float type), and
        the block's figures: `merge`'s and `_Merged.figures`' float32 operations, with what is stored read back into
        ΔW's buffer once its norm is taken, and the row norms written into one tensor and summed as `rows_sq` sums
        them (the same bytes and figures). Not `merge` followed by the figures: that cost 1.04× the wall and 1.07-1.11×
        the user CPU on a 2.6 GB Flux-shaped base (`bench/merge_ab.py`, 2026-12-08), so these lines stay apart."""
        import torch

        from . import merge_kernel as kernel
        from .merge_placed_plan import BlockFigures

        rows, n, norm = w.shape[0], w.numel(), torch.linalg.vector_norm
        weight, delta, error = torch.empty(3, rows)  # per row: ‖W‖, ‖ΔW‖, ‖stored − merged‖
        merged, moved = buffers[1][:n].view(rows, -1), buffers[2][:n].view(rows, -1)
        norm(merged.copy_(w), dim=1, out=weight)
        moved.copy_(w)  # converted again: half the bytes of a float32 copy when `w` is 16-bit
        merged = kernel.merge_rows(merged, self.deltas, start, self.device)
        norm(torch.sub(merged, moved, out=moved), dim=1, out=delta)
        delta_sq = kernel.sum_sq(delta)
        if not math.isfinite(delta_sq) and not kernel.all_finite(merged):  # as in `merge`: before it is stored
            raise self.non_finite()
        target.copy_(merged)
        norm(moved.copy_(target).sub_(merged), dim=1, out=error)  # exact: within a rounding of each other
        return BlockFigures(kernel.sum_sq(weight), delta_sq, 0.0, kernel.sum_sq(error))

    def non_finite(self) -> NumericError:
        return NumericError(f"merged tensor {self.name!r} contains NaN or Inf; nothing was written",
                            hint="check the inputs with 'loractl inspect --stats ADAPTER'")  # fmt: skip


@dataclass(frozen=True)
class _Merged:
    """One block of rows merged: W + ΔW (the block's shape), and as (rows, cols) float32 W (overwritten by ΔW
    unless the stored type is block-quantized) and ΔW = merged − W, with their squared norms; in `buffers`."""

    merged: torch.Tensor
    start: torch.Tensor
    delta: torch.Tensor
    weight_sq: float
    delta_sq: float
    buffers: torch.Tensor

    def stored(self, values: torch.Tensor) -> torch.Tensor | None:
        """What the output holds for this block, as float32 (`buffers`' first row: the read is converted by now);
        None when that is W + ΔW itself."""
        if values is self.merged:
            return None
        return self.buffers[0][: self.delta.numel()].view(self.delta.shape).copy_(values.reshape(self.delta.shape))

    def figures(self, stored: torch.Tensor | None, quantized: bool) -> BlockFigures:
        from .merge_placed_plan import block_figures

        merged = self.merged.reshape(self.delta.shape)
        return block_figures(self.start, self.delta, merged, self.weight_sq, self.delta_sq, stored, quantized)


class _Buffers:
    """Float32 buffers of `BLOCK` values for the blocks in flight, reused: the stored rows read, then what is stored
    read back (a block cast into its target, `_Block.cast`: into ΔW's); W + ΔW; W, then ΔW; and where the stored type
    is block-quantized (W is needed to the end), ΔW. A fresh allocation costs a page fault for every 4 KB of it, and
    heap ones from several threads fragment the heap. A staged store that hands back W + ΔW itself as what it stores
    (a float32 cast) may still be writing it: those buffers are not reused. Main thread only."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {3: [], 4: []}

    def take(self, numel: int, quantized: bool) -> torch.Tensor:
        import torch

        rows = 4 if quantized else 3
        if numel > BLOCK:  # a block of a few very long rows, a whole tensor (DoRA over columns)
            return torch.empty(rows, numel)
        return self._free[rows].pop() if self._free[rows] else torch.empty(rows, BLOCK)

    def give(self, buffers: torch.Tensor) -> None:
        if buffers.shape[1] == BLOCK:
            self._free[buffers.shape[0]].append(buffers)


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
