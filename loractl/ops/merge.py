"""Merge adapters into a base checkpoint, one tensor at a time (`loractl merge`).

plan from headers (`merge_plan`) → load the adapters (small) → stream the base into a sharded
output under a temporary name → check every written tensor → fsync → rename. Merged tensors go
through in row blocks (`merge_kernel`), computed while a writer thread (`WriteQueue`) writes the
previous ones; tensors written unchanged are copied file to file in the kernel (`copy_file_range`).
Peak memory is a few blocks and the adapters, whatever the model or the size of one tensor. The
base fingerprint, and the finite check of the copied tensors, run on a third thread; hashing needs
no torch, so this module imports none until the hash is under way, and on a second core the hash
(GBs of sha256) runs while torch is being imported.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..bases import open_base
from ..errors import NumericError
from ..io import interrupt
from ..io.atomic import atomic_output, check_output, io_errors
from ..io.checkpoint import RECORD_NAME, Checkpoint
from ..io.checkpoint_writer import write_sharded
from ..io.config_json import read_config
from ..io.safetensors_writer import TensorData, TensorSpec
from .merge_placed_plan import PlacedPlan
from .merge_plan import MergePlan, TensorPlan, Update, plan_merge
from .merge_report import ROUNDING_WARN as ROUNDING_WARN  # the public name, re-exported
from .merge_report import MergedModule, MergeReport, round_figure
from .merge_shared import MergeProgress, check_base_fingerprints, record_scheme, recorded_fingerprint

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter
    from ..formats.options import ReadOptions
    from ..io.write_queue import WriteQueue
    from .merge_io import ReusingReader
    from .merge_kernel import BlockStats, Delta


def merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
    force: bool = False,
    allow_base_mismatch: bool = False,
    progress: Callable[[MergeProgress], None] | None = None,
    device: str = "cpu",
    keep_quant: bool = False,
    imatrix: str | Path | None = None,
) -> MergeReport:
    """Write base + Σ wᵢ·ΔWᵢ to `output`, streaming; see `plan_merge` for the arguments.

    The base is any kind `loractl.bases` knows: a Hugging Face checkpoint gives an output directory,
    a GGUF model or a single-file SD checkpoint one file in the base's own types, a bitsandbytes or
    FP8 checkpoint a directory, dequantized or (`keep_quant`) requantized; all report in a
    `MergeReport`. `device` (cpu, cuda, mps, auto) runs the arithmetic there; the bytes are the CPU's.

    Raises `MergePlanError` / `PlacedPlanError` listing every mismatch before anything is written;
    `NumericError` when a written tensor would hold NaN/Inf, `IntegrityError` when an adapter records
    another base's fingerprint (the same weights in another floating dtype are that base;
    `allow_base_mismatch` merges anyway and says so in the report): in every failure nothing is left at `output`.
    """
    plan = plan_merge(
        base, adapters, weights=weights, dtype=dtype, max_shard_size=max_shard_size, format=format,
        read_options=read_options, keep_quant=keep_quant, imatrix=imatrix,
    )  # fmt: skip
    return execute_merge(
        plan, output, force=force, allow_base_mismatch=allow_base_mismatch, progress=progress, device=device
    )


def execute_merge(
    plan: MergePlan | PlacedPlan,
    output: str | Path,
    *,
    force: bool = False,
    allow_base_mismatch: bool = False,
    progress: Callable[[MergeProgress], None] | None = None,
    device: str = "cpu",
) -> MergeReport:
    """Carry out a checked plan (the CLI plans first to show a dry run or size a progress bar)."""
    if isinstance(plan, PlacedPlan):
        from .merge_placed import execute_placed_merge

        return execute_placed_merge(plan, output, force, allow_base_mismatch, progress, device)
    plan.check()
    output = Path(output)
    check_output(output, [plan.base, *(a.path for a in plan.adapters)], force=force)  # before torch is imported
    stop_hash = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="fingerprint") as aside:
        prints = aside.submit(_fingerprints, plan, stop_hash)  # first: it needs no torch
        try:
            from .devices import resolve_device  # torch, imported while the hash runs

            where = resolve_device(device)
            with io_errors(output), atomic_output(output, force=force) as tmp:
                return _run(plan, tmp, output, progress, allow_base_mismatch, where, aside, prints)
        finally:
            stop_hash.set()  # a failure does not wait for the rest of the hash (after success it is done)


def _run(
    plan: MergePlan,
    tmp: Path,
    output: Path,
    progress: Callable[[MergeProgress], None] | None,
    allow_mismatch: bool,
    device: torch.device,
    aside: ThreadPoolExecutor,
    prints: Future[tuple[str | None, ...]],
) -> MergeReport:
    from ..formats import load_adapter
    from ..formats.options import ReadOptions
    from ..io.write_queue import WriteQueue
    from .merge_io import ReusingReader
    from .merge_kernel import BLOCK_ELEMENTS, kernel_threads

    tmp.mkdir()
    options = plan.read_options or ReadOptions(base=plan.base)
    adapters = [load_adapter(a.path, format=a.info.format, options=options) for a in plan.adapters]
    with (
        kernel_threads(),
        Checkpoint(plan.base) as ckpt,
        ReusingReader(ckpt) as reader,
        WriteQueue(BLOCK_ELEMENTS * 8) as queue,
    ):
        # before a byte is written: each adapter's recorded base against this base
        notes: tuple[str, ...] = ()
        if any(recorded_fingerprint(a.info) for a in plan.adapters):
            with closing(open_base(plan.base)) as base:
                pairs = [(a.path, a.info) for a in plan.adapters]
                notes = check_base_fingerprints(base, pairs, prints.result(), allow_mismatch)
        stream = _Stream(plan, reader, adapters, progress, queue, device)
        copied = aside.submit(_check_copies, plan, stream.copies)
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
        shards = write_sharded(
            tmp, specs, stream.produce, plan.max_shard_bytes, {"format": "pt"}, stream.written, queue
        )
        fingerprints = prints.result()
        copied.result()
    report = MergeReport(
        output=output,
        plan=plan,
        modules=tuple(sorted(stream.modules, key=lambda m: (m.adapter, m.module))),
        fingerprints=fingerprints,
        adapter_hashes=tuple(a.content_hash() for a in adapters),
        tensors_checked=stream.tensors_done,
        tensors_copied=len(stream.copies),
        shards=tuple(p.name for p in shards),
        base_notes=notes,
    )
    _copy_files(plan, tmp, report)
    return report


class _Stream:
    """Produces each output tensor when the writer asks for it, and keeps the per-module figures."""

    def __init__(
        self,
        plan: MergePlan,
        reader: ReusingReader,
        adapters: list[Adapter],
        progress: Callable[[MergeProgress], None] | None,
        queue: WriteQueue,
        device: torch.device,
    ) -> None:
        self.plan, self.reader, self.adapters, self.progress = plan, reader, adapters, progress
        self.queue, self.device = queue, device
        self.by_name = {t.name: t for t in plan.tensors}
        self.copies = [t for t in plan.tensors if _unchanged(t, reader)]  # copied as bytes, checked aside
        self.modules: list[MergedModule] = []
        self.tensors_done = self.bytes_done = 0

    def produce(self, name: str) -> TensorData:
        interrupt.check()  # Ctrl-C stops the merge at the next tensor, even if its KeyboardInterrupt was lost
        t = self.by_name[name]
        if t.source is not None and _unchanged(t, self.reader):
            return self.reader.file_range(t.source)
        return self._blocks(t)

    def written(self, name: str) -> None:
        self.tensors_done += 1
        self.bytes_done += self.by_name[name].nbytes
        if self.progress:
            total = len(self.plan.tensors)
            self.progress(MergeProgress(name, self.tensors_done, total, self.bytes_done, self.plan.total_bytes))

    def _blocks(self, t: TensorPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        from ..io.tensor_bytes import torch_dtype
        from .merge_io import matrix_shape
        from .merge_kernel import BlockStats, bias_delta, merged_blocks, module_delta

        full = next((u for u in t.updates if u.role == "full"), None)
        assert t.source is not None or full is not None
        shape = matrix_shape(t.shape)
        if full:
            start = self.adapters[full.adapter].full_tensors[full.module].reshape(shape)
            rows_of = lambda a, b: start[a:b]  # noqa: E731
        else:
            source = str(t.source)
            rows_of = lambda a, b: self.reader.rows(source, a, b)  # noqa: E731
        lowrank = [u for u in t.updates if u.role != "full"]
        deltas = []
        for u in lowrank:
            module, weight = self.adapters[u.adapter].modules[u.module], self.plan.adapters[u.adapter].weight
            deltas.append(bias_delta(module, weight) if u.role == "bias" else module_delta(module, weight))
        stats = BlockStats()
        yield from merged_blocks(rows_of, shape, deltas, torch_dtype(t.dtype), self._buffer, stats, self.device)
        if not stats.finite:
            what = f"merged tensor {t.name!r}" if deltas else f"tensor {t.name!r}"
            raise NumericError(
                f"{what} contains NaN or Inf; nothing was written",
                hint="check the inputs with 'loractl inspect --stats ADAPTER' (or a wider --dtype if values overflow)",
            )
        if deltas:
            pairs = zip(lowrank, deltas, strict=True)
            self.modules += [self._report(t, u, d, stats, deltas) for u, d in pairs if u.role != "bias"]

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        buf = self.queue.buffer(nbytes)
        return buf, buf

    def _report(self, t: TensorPlan, u: Update, d: Delta, stats: BlockStats, deltas: list[Delta]) -> MergedModule:
        from .merge_kernel import deltas_norm

        module, weight = self.adapters[u.adapter].modules[u.module], self.plan.adapters[u.adapter].weight
        norm = math.sqrt(stats.weight_sq)
        rel = deltas_norm([d]) / norm if norm > 0 else None
        dora = any(x.magnitude is not None for x in deltas)
        change = math.sqrt(stats.change_sq) if dora else deltas_norm(deltas)
        loss = math.sqrt(stats.rounding_sq) / change if change > 0 else None
        return MergedModule(
            u.adapter, u.module, t.name, u.role, t.dtype, weight, module.scale, module.rank, rel, rounding_loss=loss
        )


def _unchanged(t: TensorPlan, reader: ReusingReader) -> bool:
    """Whether the output tensor is a base tensor's bytes as they are (no update, same dtype)."""
    return t.source is not None and not t.updates and reader.ckpt.info(t.source).dtype == t.dtype


def _check_copies(plan: MergePlan, copies: list[TensorPlan]) -> None:
    """The NaN/Inf check of the tensors copied as bytes, from their own reader, beside the merge."""
    from .merge_io import ReusingReader, matrix_shape
    from .merge_kernel import BLOCK_ELEMENTS, all_finite

    with Checkpoint(plan.base) as ckpt, ReusingReader(ckpt) as reader:
        for t in copies:
            assert t.source is not None
            rows, cols = matrix_shape(t.shape)
            step = max(1, BLOCK_ELEMENTS // max(cols, 1))
            for start in range(0, rows, step):
                if not all_finite(reader.rows(t.source, start, min(rows, start + step))):
                    raise NumericError(
                        f"base tensor {t.name!r} contains NaN or Inf; nothing was written",
                        hint="the base itself is damaged: check it with 'loractl inspect --stats'",
                    )


def _fingerprints(plan: MergePlan, stop: threading.Event) -> tuple[str | None, ...]:
    """Per adapter, the fingerprint of the base weights it touches (`Base.fingerprint`);
    abandoned once `stop` is set (the merge failed)."""
    with closing(open_base(plan.base)) as base:
        return tuple(base.fingerprint(list(a.info.modules), stop.is_set, scheme=record_scheme(a.info))
                     for a in plan.adapters)  # fmt: skip


def _copy_files(plan: MergePlan, tmp: Path, report: MergeReport) -> None:
    """Non-weight files byte for byte, config.json with the plan's updates, and the provenance record."""
    record = _record(plan, report)
    for src in plan.files:
        if src.name == "config.json" and plan.config_updates:
            config = {**(read_config(src) or {}), **plan.config_updates}
            (tmp / src.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif src.name == RECORD_NAME:
            record["base_record"] = json.loads(src.read_text())  # the base was itself a merge: keep its history
        else:
            shutil.copyfile(src, tmp / src.name)
    (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _record(plan: MergePlan, report: MergeReport) -> dict[str, Any]:
    """The provenance written to OUT/loractl_merge.json: no paths, no times, so the bytes are deterministic."""
    adapters = [
        {
            "content_hash": h,
            "format": a.info.format,
            "weight": a.weight,
            "base_model": a.info.base_model,
            "base_fingerprint": fp,
        }
        for a, h, fp in zip(plan.adapters, report.adapter_hashes, report.fingerprints, strict=True)
    ]
    modules = [
        {
            "adapter": m.adapter,
            "module": m.module,
            "relative_delta": round_figure(m.relative_delta),
            "rounding_loss": round_figure(m.rounding_loss),
        }
        for m in report.modules
    ]
    return {
        "op": "merge",
        "loractl_version": __version__,
        "adapters": adapters,
        "dtype": plan.dtype,
        "untied": plan.untied,
        "config_updates": plan.config_updates,
        "rounding_loss": report.rounding,
        "modules": modules,
    }
