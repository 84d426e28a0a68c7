"""Merge adapters into a base checkpoint, one tensor at a time (`loractl merge`).

plan from headers (`merge_plan`) → load the adapters (small) → stream the base tensor by tensor
into a sharded output under a temporary name → check every written tensor → rename. Peak memory
is one base tensor, a float32 block buffer (`merge_kernel`) and the adapters, whatever the model.
The base fingerprint is hashed on a second thread while the main one merges.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import IntegrityError, LoractlError, NumericError
from ..io.atomic import atomic_output, ensure_distinct
from ..io.checkpoint import Checkpoint, same_base
from ..io.checkpoint_writer import write_sharded
from ..io.config_json import read_config
from ..io.safetensors_writer import TensorSpec
from .merge_io import Buffer, ReusingReader
from .merge_kernel import kernel_threads
from .merge_plan import AdapterPlan, MergePlan, TensorPlan, Update, plan_merge

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter
    from .merge_kernel import Delta

RECORD_NAME = "loractl_merge.json"


@dataclass(frozen=True)
class MergedModule:
    """One adapter module as merged; `relative_delta` is ‖w·scale·B·A‖_F / ‖W‖_F (None when ‖W‖ = 0)."""

    adapter: int
    module: str
    tensor: str
    role: str
    weight: float
    scale: float
    rank: int
    relative_delta: float | None


@dataclass(frozen=True)
class MergeProgress:
    """Where a running merge is, after each written tensor."""

    tensor: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote; `fingerprints[i]` is the base fingerprint over adapter i's weights."""

    output: Path
    plan: MergePlan
    modules: tuple[MergedModule, ...]
    shards: tuple[str, ...]
    fingerprints: tuple[str, ...]
    adapter_hashes: tuple[str, ...]
    tensors_checked: int
    base_notes: tuple[str, ...] = ()  # a base recognised in another dtype, or a mismatch allowed

    def record(self) -> dict[str, Any]:
        """The provenance written to OUT/loractl_merge.json: no paths, no times, so the bytes are deterministic."""
        adapters = [
            {
                "content_hash": h,
                "format": a.info.format,
                "weight": a.weight,
                "base_model": a.info.base_model,
                "base_fingerprint": fp,
            }
            for a, h, fp in zip(self.plan.adapters, self.adapter_hashes, self.fingerprints, strict=True)
        ]
        modules = [
            {"adapter": m.adapter, "module": m.module, "relative_delta": _round(m.relative_delta)} for m in self.modules
        ]
        return {
            "op": "merge",
            "loractl_version": __version__,
            "adapters": adapters,
            "dtype": self.plan.dtype,
            "untied": self.plan.untied,
            "config_updates": self.plan.config_updates,
            "modules": modules,
        }

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "output": str(self.output),
            **{k: v for k, v in plan.to_json().items() if k not in ("tensors", "problems")},
            "shards": list(self.shards),
            "tensors_checked": self.tensors_checked,
            "nonfinite": 0,
            "fingerprints": list(self.fingerprints),
            "base_notes": list(self.base_notes),
            "adapter_hashes": list(self.adapter_hashes),
            "modules": [asdict(m) for m in self.modules],
        }


def merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    allow_base_mismatch: bool = False,
    progress: Callable[[MergeProgress], None] | None = None,
) -> MergeReport:
    """Write base + Σ wᵢ·ΔWᵢ to `output` (a directory), streaming; see `plan_merge` for the arguments.

    Raises `MergePlanError` listing every mismatch before anything is written; `NumericError` when a
    written tensor would hold NaN/Inf, `IntegrityError` when an adapter records another base's
    fingerprint (the same weights in another floating dtype are that base; `allow_base_mismatch`
    merges anyway and says so in the report): in every failure nothing is left at `output`.
    """
    plan = plan_merge(base, adapters, weights=weights, dtype=dtype, max_shard_size=max_shard_size)
    return execute_merge(plan, output, force=force, allow_base_mismatch=allow_base_mismatch, progress=progress)


def execute_merge(
    plan: MergePlan,
    output: str | Path,
    *,
    force: bool = False,
    allow_base_mismatch: bool = False,
    progress: Callable[[MergeProgress], None] | None = None,
) -> MergeReport:
    """Carry out a checked plan (the CLI plans first to show a dry run or size a progress bar)."""
    plan.check()
    output = Path(output)
    ensure_distinct(output, [plan.base, *(a.path for a in plan.adapters)])
    try:
        with atomic_output(output, force=force) as tmp:
            return _run(plan, tmp, output, progress, allow_base_mismatch)
    except OSError as e:
        raise LoractlError(
            f"I/O error: {e.strerror or e}",
            path=e.filename or output,
            hint="check that the output's directory is writable and the disk has room; nothing was written",
        ) from e


def _run(
    plan: MergePlan, tmp: Path, output: Path, progress: Callable[[MergeProgress], None] | None, allow_mismatch: bool
) -> MergeReport:
    from ..formats import load_adapter
    from ..formats.options import ReadOptions

    tmp.mkdir()
    options = plan.read_options or ReadOptions(base=plan.base)
    adapters = [load_adapter(a.path, format=a.info.format, options=options) for a in plan.adapters]
    with (
        kernel_threads(),
        Checkpoint(plan.base) as ckpt,
        ReusingReader(ckpt) as reader,
        ThreadPoolExecutor(1, thread_name_prefix="fingerprint") as pool,
    ):
        prints = pool.submit(_fingerprints, plan)
        notes = _check_fingerprints(plan, prints, allow_mismatch) if any(_recorded(a) for a in plan.adapters) else ()
        stream = _Stream(plan, reader, adapters, progress)
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
        shards = write_sharded(tmp, specs, stream.produce, plan.max_shard_bytes, {"format": "pt"}, stream.written)
        fingerprints = prints.result()
    report = MergeReport(
        output=output,
        plan=plan,
        modules=tuple(sorted(stream.modules, key=lambda m: (m.adapter, m.module))),
        shards=tuple(p.name for p in shards),
        fingerprints=fingerprints,
        adapter_hashes=tuple(a.content_hash() for a in adapters),
        tensors_checked=stream.tensors_done,
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
    ) -> None:
        self.plan, self.reader, self.adapters, self.progress = plan, reader, adapters, progress
        self.scratch = Buffer()  # merged tensors are computed here; the writer takes each before the next
        self.by_name = {t.name: t for t in plan.tensors}
        self.modules: list[MergedModule] = []
        self.tensors_done = self.bytes_done = 0

    def produce(self, name: str) -> torch.Tensor:
        from .merge_kernel import all_finite

        t = self.by_name[name]
        tensor = self._compute(t)
        if not all_finite(tensor):
            what = f"base tensor {name!r}" if t.action == "copy" else f"merged tensor {name!r}"
            raise NumericError(
                f"{what} contains NaN or Inf; nothing was written",
                hint="check the inputs with 'loractl inspect --stats ADAPTER' (or a wider --dtype if values overflow)",
            )
        return tensor

    def written(self, name: str) -> None:
        self.tensors_done += 1
        self.bytes_done += self.by_name[name].nbytes
        if self.progress:
            total = len(self.plan.tensors)
            self.progress(MergeProgress(name, self.tensors_done, total, self.bytes_done, self.plan.total_bytes))

    def _compute(self, t: TensorPlan) -> torch.Tensor:
        from ..io.tensor_bytes import torch_dtype
        from .merge_kernel import add_deltas_into, bias_delta, module_delta

        dtype = torch_dtype(t.dtype)
        full = next((u for u in t.updates if u.role == "full"), None)
        assert t.source is not None or full is not None
        start = self.adapters[full.adapter].full_tensors[full.module] if full else self.reader.read(str(t.source))
        lowrank = [u for u in t.updates if u.role != "full"]
        if not lowrank:
            return start.to(dtype)
        deltas = []
        for u in lowrank:
            module, weight = self.adapters[u.adapter].modules[u.module], self.plan.adapters[u.adapter].weight
            deltas.append(bias_delta(module, weight) if u.role == "bias" else module_delta(module, weight))
        out = self.scratch.view(t.dtype, t.shape)
        norm = add_deltas_into(out, start, deltas)
        self.modules += [self._report(t, u, d, norm) for u, d in zip(lowrank, deltas, strict=True) if u.role != "bias"]
        return out

    def _report(self, t: TensorPlan, u: Update, d: Delta, norm: float) -> MergedModule:
        from .merge_kernel import delta_norm

        module, weight = self.adapters[u.adapter].modules[u.module], self.plan.adapters[u.adapter].weight
        rel = delta_norm(d) / norm if norm > 0 else None
        return MergedModule(u.adapter, u.module, t.name, u.role, weight, module.scale, module.rank, rel)


def _recorded(a: AdapterPlan) -> str | None:
    return a.info.record.base_fingerprint if a.info.record else None


def _fingerprints(plan: MergePlan) -> tuple[str, ...]:
    """Per adapter, the fingerprint of the base weights it touches (`Checkpoint.fingerprint`)."""
    with Checkpoint(plan.base) as ckpt:
        return tuple(ckpt.fingerprint(list(a.fingerprint_names)) for a in plan.adapters)


def _check_fingerprints(plan: MergePlan, prints: Future[tuple[str, ...]], allow_mismatch: bool) -> tuple[str, ...]:
    """Before a byte is written: each adapter's recorded base against this base (in any floating dtype)."""
    fingerprints, notes = prints.result(), []
    with Checkpoint(plan.base) as ckpt:
        for a, actual in zip(plan.adapters, fingerprints, strict=True):
            recorded = _recorded(a)
            if a.info.record is None or not recorded or recorded == actual:
                continue
            views, names = a.info.record.base_views, list(a.fingerprint_names)
            if same_base(recorded, views, actual, partial(ckpt.fingerprint_views, names)):
                notes.append(f"{a.path}: this base holds the adapter's base weights in another floating dtype")
            elif allow_mismatch:
                notes.append(f"{a.path}: made for another base (fingerprint {recorded[:19]}…), merged anyway")
            else:
                raise IntegrityError(
                    f"the adapter was made for another base (its base fingerprint {recorded[:19]}…, "
                    f"this base {actual[:19]}…); nothing was written",
                    path=a.path,
                    hint="merge it into the base it was trained or extracted on "
                    "(--allow-base-mismatch merges anyway if you know they match)",
                )
    return tuple(notes)


def _copy_files(plan: MergePlan, tmp: Path, report: MergeReport) -> None:
    """Non-weight files byte for byte, config.json with the plan's updates, and the provenance record."""
    record = report.record()
    for src in plan.files:
        if src.name == "config.json" and plan.config_updates:
            config = {**(read_config(src) or {}), **plan.config_updates}
            (tmp / src.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif src.name == RECORD_NAME:
            record["base_record"] = json.loads(src.read_text())  # the base was itself a merge: keep its history
        else:
            shutil.copyfile(src, tmp / src.name)
    (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")
