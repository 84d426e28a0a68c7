"""`loractl merge` into a GGUF model or a single-file SD checkpoint: plan, run, and the report with rounding losses."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._output import emit_json, progress, stderr, stdout, warn

if TYPE_CHECKING:
    from ..ops.merge_layouts import Layout
    from ..ops.placement import PlacedMergeReport, PlacedPlan

TABLE_ROWS = 40


def run(
    layout: Layout,
    base: str,
    adapters: Sequence[str],
    output: str | None,
    *,
    weights: Sequence[float],
    dtype: str | None,
    max_shard_size: str | None,
    dry_run: bool,
    force: bool,
    as_json: bool,
) -> None:
    """The whole command for these bases: one output file, every tensor in its own type."""
    from ..errors import UsageError
    from ..ops.merge_layouts import merge_layout, plan_layout_merge

    if dtype or max_shard_size:
        raise UsageError(
            "--dtype and --max-shard-size apply to Hugging Face checkpoints, not to a GGUF or single-file base",
            hint="this merge writes one file and keeps every tensor's type; drop the option",
        )
    if dry_run:
        plan = plan_layout_merge(layout, base, adapters, weights=weights or None)
        _show_plan(plan, as_json)
        if plan.problems:
            sys.exit(1)
        return
    if output is None:
        raise UsageError("missing -o/--output", hint="name the output file, or pass --dry-run")
    report = merge_layout(
        layout, base, adapters, output, weights=weights or None, force=force,
        track=lambda items, n: progress(items, n, "merging"),
    )  # fmt: skip
    if as_json:
        emit_json(report.to_json())
    else:
        _show_report(report)
    from ..ops.merge import ROUNDING_WARN

    rounding = report.rounding
    if rounding is not None and rounding["worst"] > ROUNDING_WARN:
        warn(
            f"rounding into the stored types removes up to {rounding['worst']:.0%} of a module's ΔW "
            "(the rounding-loss column); merge into a wider base (F16/F32) or apply the adapter at run time"
        )


def _show_plan(plan: PlacedPlan, as_json: bool) -> None:
    from rich.markup import escape

    if as_json:
        emit_json(plan.to_json())
        return
    for key, updates in plan.updates.items():
        stdout.print(f"{key}  ← " + ", ".join(f"{u.module}#{u.adapter}" for u in updates), highlight=False)
    stdout.print(
        f"{plan.kind}: {len(plan.updates)} of {plan.tensors_total} tensors merged, the others copied byte for byte",
        highlight=False,
    )
    for p in plan.problems:
        stderr.print(f"[red]problem:[/] {escape(f'{p.path}: {p.render()}')}", highlight=False)


def _show_report(report: PlacedMergeReport) -> None:
    from rich.table import Column, Table

    mods = report.modules
    if len(mods) <= TABLE_ROWS:
        table = Table(Column("module", overflow="fold"), "type", "rank", "‖ΔW‖/‖W‖", "rounding loss")
        for m in mods:
            table.add_row(m.module, m.stored_type, str(m.rank), _fmt(m.relative_delta), _fmt(m.rounding_loss))
        stdout.print(table)
    if (r := report.rounding) is not None:
        stdout.print(
            f"rounding into the stored types removes {r['median']:.2%} of ΔW (median), {r['worst']:.2%} at worst",
            highlight=False,
        )
    stdout.print(
        f"{len(report.plan.updates)} tensors merged, {report.tensors_copied} copied byte for byte into {report.output}",
        highlight=False,
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3e}"
