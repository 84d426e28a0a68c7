"""`loractl merge`: adapters into a base checkpoint, streamed tensor by tensor."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from ..patterns import natural_key
from ._device import device_option
from ._input_options import Inputs, input_options
from ._output import emit_json, stderr, stdout, warn
from ._text import adapter_labels, fit_path, human_size, name_table, percent, relative

if TYPE_CHECKING:
    from ..ops.merge_placed_plan import PlacedPlan
    from ..ops.merge_plan import MergePlan
    from ..ops.merge_report import MergedModule, MergeReport
    from ..ops.merge_shared import MergeProgress

TABLE_ROWS = 40  # per-module rows shown before the table gives way to a summary


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Output directory (a file for GGUF and single-file bases; required unless --dry-run).",
)
@click.option(
    "--weight", "weights", type=float, multiple=True, help="One per adapter, in order (default 1; negative subtracts)."
)
@click.option("--dtype", help="Output dtype of floating tensors: float32, bfloat16, float16 (default: the base's).")
@click.option("--max-shard-size", help="Largest output shard, e.g. 5GB (default: the base's largest shard).")
@click.option(
    "--keep-quant",
    is_flag=True,
    help="Requantize a bitsandbytes base's merged weights as they were (FP8: the default).",
)
@device_option
@click.option("--dry-run", is_flag=True, help="Print the plan from headers only; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--allow-base-mismatch", is_flag=True, help="Merge even if an adapter records another base's fingerprint."
)
@click.option(
    "--imatrix",
    type=click.Path(),
    help="llama.cpp's importance matrix (imatrix.gguf or .dat) to requantize a GGUF base's tensors with; "
    "needed for IQ2_XXS, IQ2_XS, IQ1_S.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@input_options(base=False, per_input=False)
def command(
    base: str,
    adapters: tuple[str, ...],
    output: str | None,
    weights: tuple[float, ...],
    dtype: str | None,
    max_shard_size: str | None,
    keep_quant: bool,
    device: str,
    dry_run: bool,
    force: bool,
    allow_base_mismatch: bool,
    imatrix: str | None,
    as_json: bool,
    inputs: Inputs,
) -> None:
    """Merge ADAPTERS into the BASE checkpoint: W' = W + Σ weight·scale·B·A, one tensor at a time.

    \b
    Examples:
      loractl merge fixtures/tiny-llama fixtures/adapters/tiny-qv -o merged
      loractl merge base a b --weight 1 --weight -0.5 -o merged --dtype bfloat16
      loractl merge base a --dry-run --json
      loractl merge base a -o merged --device auto
      loractl merge model.Q8_0.gguf adapter -o merged.Q8_0.gguf
      loractl merge model-Q4_K_M-00001-of-00002.gguf adapter -o merged.Q4_K_M.gguf
      loractl merge sd_xl_base_1.0.safetensors kohya_lora.safetensors -o merged.safetensors
      loractl merge flux1-dev.safetensors lora.safetensors -o merged.safetensors
      loractl merge FLUX.1-dev/transformer lora.safetensors -o merged

    A GGUF model (llama.cpp) or a single-file Stable Diffusion checkpoint (SD 1.x/2.x/SDXL) is
    written as one file: every tensor keeps its type (quantized ones are requantized), and the
    report gives each module's rounding loss, the share of ΔW the stored type removes. A
    bitsandbytes checkpoint is written dequantized (--keep-quant: requantized); an FP8 one stays
    FP8 (--dtype: dequantized). A diffusion transformer (Flux.1, SD3, Wan, ...) as diffusers'
    transformer/ directory, a pipeline or the original single file takes an adapter in any layout
    (kohya fused q/k/v, diffusers split) and keeps its files, names and types.
    """
    from ..errors import UsageError
    from ..ops.merge_plan import plan_merge

    plan = plan_merge(
        base,
        list(adapters),
        weights=weights or None,
        dtype=dtype,
        max_shard_size=max_shard_size,
        format=inputs.format,
        read_options=inputs.read,
        keep_quant=keep_quant,
        imatrix=imatrix,
    )
    if dry_run:
        _show_plan(plan, as_json)
        if plan.problems:
            sys.exit(1)  # the plan is shown; its problems are the result
        return
    if output is None:
        raise UsageError("missing -o/--output", hint="name the output, or pass --dry-run")
    from ..ops.merge import execute_merge  # imports torch itself, once the base's hash is under way

    with _progress() as progress:
        report = execute_merge(
            plan, output, force=force, allow_base_mismatch=allow_base_mismatch, progress=progress, device=device
        )
    for note in report.base_notes:
        warn(note)
    for w in report.warnings:
        warn(w)
    if as_json:
        emit_json(report.to_dict())
    else:
        _show_report(report)


def _show_plan(plan: MergePlan | PlacedPlan, as_json: bool) -> None:
    from rich.markup import escape

    from ..ops.merge_placed_plan import PlacedPlan

    if as_json:
        emit_json(plan.to_dict())
        return
    rows: list[tuple[str, ...]]
    if isinstance(plan, PlacedPlan):
        labels = adapter_labels(plan.adapter_paths)
        rows = [(k, ", ".join(f"{labels[u.adapter]}: {u.module}" for u in us)) for k, us in plan.updates.items()]
        stdout.print(name_table(stdout.get(), ("tensor", "updates"), rows, title=f"merge plan for {plan.base}"))
    else:
        labels = adapter_labels(plan.adapter_paths)
        rows = []
        for t in plan.tensors:
            if t.action != "copy":
                updates = ", ".join(labels[u.adapter] + ("" if u.role == "lora" else f" ({u.role})") for u in t.updates)
                from_ = "adapter" if t.source is None else ("" if t.source == t.name else t.source)
                rows.append((t.name, t.action, from_, str(list(t.shape)), t.dtype, updates))
        headers = ("tensor", "action", "from", "shape", "dtype", "updates")
        stdout.print(name_table(stdout.get(), headers, rows, title=f"merge plan for {plan.base}"))
    stdout.print(_summary(plan), highlight=False)
    for p in plan.problems:
        stderr.print(f"[red]problem:[/] {escape(f'{p.path}: {p.render()}')}", highlight=False)


def _summary(plan: MergePlan | PlacedPlan) -> str:
    from ..ops.merge_placed_plan import PlacedPlan

    if isinstance(plan, PlacedPlan):
        n, converted = len(plan.updates), plan.tensors_converted
        if converted:
            return f"{plan.kind}: {n} of {plan.tensors_total} tensors merged, {converted} converted"
        return f"{plan.kind}: {n} of {plan.tensors_total} tensors merged in their own types"
    counts = ", ".join(f"{plan.count(a)} {a}" for a in ("merge", "replace", "untie", "copy"))
    lines = [f"{len(plan.tensors)} tensors ({counts}), {human_size(plan.total_bytes)}"]
    lines += [
        f"untie: {n} written from the shared embedding; config.json gets tie_word_embeddings=false" for n in plan.untied
    ]
    if plan.skipped_files:
        lines.append("not copied (weights of another format): " + ", ".join(p.name for p in plan.skipped_files))
    return "\n".join(lines)


def _module_cells(mods: Sequence[MergedModule]) -> list[str]:
    """Each row's module, and where one module went to several tensors (a fused q/k/v on a base's split
    `to_q`, `to_k`, `to_v`), the part of the tensor's name that tells them apart (`… → to_q`)."""
    tensors: dict[tuple[int, str], list[str]] = {}
    for m in mods:
        tensors.setdefault((m.adapter, m.module), []).append(m.tensor.removesuffix(".weight"))
    cells = []
    for m in mods:
        names = tensors[(m.adapter, m.module)]
        if len(names) < 2:
            cells.append(m.module)
            continue
        common = len(os.path.commonprefix([n.split(".") for n in names]))
        own = ".".join(m.tensor.removesuffix(".weight").split(".")[common:]) or m.tensor
        cells.append(f"{m.module} → {own}")
    return cells


def _show_report(report: MergeReport) -> None:
    """One table for every kind of base: the third column is the role (checkpoints) or the stored type."""
    mods = report.modules
    labels = adapter_labels(report.adapter_paths)
    if len(mods) <= TABLE_ROWS:
        names = _module_cells(mods)
        rows = [
            (
                labels[m.adapter],
                names[i],
                m.stored_type if report.rewritten else m.role,
                f"{m.weight:g}",
                str(m.rank),
                relative(m.relative_delta),
                percent(m.rounding_loss),
            )
            for i, m in sorted(enumerate(mods), key=lambda im: (im[1].adapter, natural_key(im[1].module), im[0]))
        ]
        headers = ("adapter", "module", "type" if report.rewritten else "role", "weight", "rank", "‖ΔW‖/‖W‖", "rounded")
        stdout.print(name_table(stdout.get(), headers, rows, name_column=1))
    else:
        rels = sorted(m.relative_delta for m in mods if m.relative_delta is not None)
        if rels:
            stdout.print(
                f"‖ΔW‖/‖W‖ over {len(rels)} modules: min {relative(rels[0])}, "
                f"median {relative(rels[len(rels) // 2])}, max {relative(rels[-1])} (all in --json)",
                highlight=False,
            )
    stdout.print(_summary(report.plan), highlight=False)
    if (r := report.rounding) is not None:
        into = "the stored types" if report.rewritten else "the output dtype"
        stdout.print(
            f"rounding into {into} removes {r['median']:.2%} of ΔW (median), {r['worst']:.2%} at worst",
            highlight=False,
        )
    for kind, kept in report.rounding_by_type.items():
        stdout.print(f"{kind}: {kept['survives_median']:.1%} of ΔW survives (median), "
                     f"{kept['survives_worst']:.1%} at worst, over {kept['modules']:g} modules", highlight=False)  # fmt: skip
    if (error := report.worst_rounding_error) is not None:
        stdout.print(f"stored tensors vs W + ΔW: {relative(error)} × ‖ΔW‖ at worst (requantization included)",
                     highlight=False)  # fmt: skip
    shards = f"; {len(report.shards)} shard(s)" if report.shards else ""
    converted = getattr(report.plan, "tensors_converted", 0)
    converted = f", {converted} converted" if converted else ""
    checked = f"{report.tensors_checked} tensors checked: no NaN/Inf{converted}, {report.tensors_copied} copied byte "
    checked += f"for byte{shards} in"
    width = stdout.get().width
    room = width - len(checked) - 1
    where = f" {fit_path(report.output, room)}" if room >= 24 else f"\n{fit_path(report.output, width)}"
    stdout.print(checked + where, highlight=False)


@contextmanager
def _progress() -> Iterator[Callable[[MergeProgress], None] | None]:
    """A bar over bytes (with the tensor count) on a terminal; nothing otherwise."""
    if not stderr.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr.get(), transient=True) as bar:
        task = bar.add_task("merging", total=None)

        def update(p: MergeProgress) -> None:
            bar.update(
                task,
                completed=p.bytes_done,
                total=p.bytes_total,
                description=f"merging {p.tensors_done}/{p.tensors_total} tensors",
            )

        yield update
