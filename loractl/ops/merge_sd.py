"""Merge kohya or diffusers LoRAs into a single-file Stable Diffusion checkpoint, streaming.

Modules are placed on the single file's tensors through diffusers' own conversion map
(`formats/sd_single_file`); the output is one safetensors file with the same names, dtypes and
metadata (plus a `loractl_merge` provenance entry), written one tensor at a time under a
temporary name. Tensors no adapter touches are copied bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._version import __version__
from ..errors import LoractlError, NumericError, UsageError
from ..formats import sd_single_file
from ..info import AdapterInfo
from ..io.atomic import atomic_output, ensure_distinct
from ..io.checkpoint import Checkpoint
from ..io.safetensors_writer import StreamWriter, TensorSpec
from .placement import PlacedMergeReport, PlacedModuleReport, PlacedPlan, module_reports, plan_placements
from .weights import check_weights

if TYPE_CHECKING:
    from ..adapter import Adapter

RECORD_KEY = "loractl_merge"


def plan_sd_merge(
    base: str | Path, adapters: Sequence[str | Path], *, weights: Sequence[float] | None = None,
    allow_pickle: bool = False,
) -> PlacedPlan:  # fmt: skip
    """Place every adapter module on a tensor of the single file, from headers only; problems are collected."""
    with Checkpoint(base) as ckpt:
        return _plan(ckpt, [_describe(a, allow_pickle) for a in adapters], check_weights(weights, len(adapters)))


def merge_sd(
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    track: Callable[[Iterable[str], int], Iterable[str]] | None = None,
) -> PlacedMergeReport:
    """Write the single file `base` with Σ wᵢ·ΔWᵢ merged in, to the file `output`; nothing is written on error."""
    from ..formats import load_adapter

    with Checkpoint(base) as ckpt:
        plan = _plan(ckpt, [_describe(a, allow_pickle) for a in adapters], check_weights(weights, len(adapters)))
        plan.check()
        ensure_distinct(output, [base, *adapters])
        loaded = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
        header = next(iter(ckpt.headers.values()))
        metadata = {**header.metadata, RECORD_KEY: _record(loaded, plan)}
        specs = [TensorSpec(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.names]
        try:
            with atomic_output(output, force=force) as tmp:
                modules = _write(ckpt, plan, loaded, StreamWriter(tmp, specs, metadata), track)
        except OSError as e:
            raise LoractlError(
                f"I/O error: {e.strerror or e}", path=e.filename or output,
                hint="check that the output's directory is writable and the disk has room; nothing was written",
            ) from e  # fmt: skip
    return PlacedMergeReport(str(output), plan, tuple(modules), plan.tensors_total - len(plan.updates))


def check_single_file(names: list[str], path: str | Path) -> str:
    """The single file's layout, or a `UsageError` for one loractl cannot map."""
    kind = sd_single_file.layout(names)
    if kind in (None, "unet-only"):
        raise UsageError(
            f"{path}: a single-file checkpoint of an unknown layout (no SD 1.x/2.x/SDXL text encoder beside "
            "model.diffusion_model.*)",
            hint="loractl merges into SD 1.x, 2.x and SDXL single files; convert others to diffusers first",
        )
    return kind


def _plan(ckpt: Checkpoint, infos: list[AdapterInfo], weights: list[float]) -> PlacedPlan:
    shapes = {n: ckpt.info(n).shape for n in ckpt.names}
    kind = check_single_file(ckpt.names, ckpt.path)
    names = sd_single_file.diffusers_names(shapes)
    return plan_placements(
        str(ckpt.path), kind, infos, weights, lambda i, m, mi: sd_single_file.place(names, shapes, m), shapes
    )


def _describe(path: str | Path, allow_pickle: bool) -> AdapterInfo:
    from ..formats import describe_adapter

    return describe_adapter(path, allow_pickle=allow_pickle)


def _write(
    ckpt: Checkpoint,
    plan: PlacedPlan,
    adapters: list[Adapter],
    writer: StreamWriter,
    track: Callable[[Iterable[str], int], Iterable[str]] | None,
) -> list[PlacedModuleReport]:
    """Every tensor in the writer's order: copied, or merged in float32 and rounded to its dtype."""
    from ..io.tensor_bytes import torch_dtype
    from .merge_kernel import all_finite
    from .placement import merge_tensor, placed_delta, rounding_loss

    rows: list[PlacedModuleReport] = []
    try:
        names = [s.name for s in writer.order]
        for name in track(names, len(names)) if track else names:
            spec = ckpt.info(name)
            tensor = ckpt.get(name)
            updates = plan.updates.get(name)
            if updates:
                deltas = [placed_delta(adapters[u.adapter].modules[u.module], u.weight, u.placement, tensor.shape[0])
                          for u in updates]  # fmt: skip
                result = merge_tensor(tensor, deltas)
                if not all_finite(result.merged):
                    raise NumericError(f"merged tensor {name!r} contains NaN or Inf; nothing was written",
                                       hint="check the inputs with 'loractl inspect --stats ADAPTER'")  # fmt: skip
                tensor = result.merged.to(torch_dtype(spec.dtype))
                loss = rounding_loss(result.merged, tensor, result.total_delta_norm)
                ranks = [adapters[u.adapter].modules[u.module].rank for u in updates]
                rows += module_reports(name, spec.dtype, updates, ranks, result, loss)
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return rows


def _record(adapters: list[Adapter], plan: PlacedPlan) -> str:
    """Provenance in the file's metadata: what was merged, no paths or times (deterministic bytes)."""
    record = {
        "op": "merge",
        "loractl_version": __version__,
        "layout": plan.kind,
        "adapters": [
            {"content_hash": a.content_hash(), "weight": w} for a, w in zip(adapters, plan.weights, strict=True)
        ],
    }
    return json.dumps(record, sort_keys=True)
