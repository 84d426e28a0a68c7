"""`loractl diff`: how two adapters (two versions) differ, module by module, from the factors alone."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

import click

from ._input_options import Inputs, input_options
from ._output import emit_json, stdout, wrote_plot
from ._text import fit_path, name_table, relative

if TYPE_CHECKING:
    from ..ops.diff import AdapterDiff

SHOWN = 15  # modules in the text summary: one screen


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print every module's figures as one JSON document.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw layer × module heatmaps.")
@click.option("--top", type=int, default=SHOWN, show_default=True, help="Modules listed in the text summary.")
@input_options()
def command(
    a: str, b: str, as_json: bool, plot: str | None, top: int, inputs: Inputs
) -> None:  # fmt: skip
    """Compare adapter A with adapter B: modules added and removed, and per common module the
    relative change ‖ΔW_A − ΔW_B‖/‖ΔW_A‖, the cosine and the column-space overlap, most changed first.

    A and B are paths or registry versions (hf://owner/name@v1, file:///DIR/owner/name@v2).

    \b
    Examples:
      loractl diff run1/adapter run2/adapter
      loractl diff hf://alice/lora@v1 hf://alice/lora@v2 --plot diff.png
      loractl diff old new --json
    """
    from ..formats import load_adapter
    from ..remote.refs import check_paths, local_copy

    check_paths([a, b])  # both, before the first is read (with torch)
    if plot:
        from ..plots import check_plot

        check_plot(plot, [a, b])
    with ExitStack() as stack:
        first, second = (load_adapter(stack.enter_context(local_copy(p)), format=inputs.format,
                                      options=inputs.options(p)) for p in (a, b))  # fmt: skip
    from ..ops.diff import diff

    result = diff(first, second)
    if plot:
        from ..plots import plot_diff

        wrote_plot(plot_diff(result, plot, title=f"{a} → {b}", inputs=[a, b]))
    return emit_json({"a": a, "b": b, **result.to_dict()}) if as_json else _render(result, a, b, top)


def _render(result: AdapterDiff, a: str, b: str, top: int) -> None:
    width = stdout.get().width
    changed = sum(m.config_changed for m in result.modules)
    overall = "n/a (A is zero)" if result.change is None else relative(result.change)
    stdout.print(f"A {fit_path(a, width - 2)}\nB {fit_path(b, width - 2)}", highlight=False)
    stdout.print(
        f"{len(result.modules)} common, {len(result.added)} added, {len(result.removed)} removed, "
        f"{changed} with new rank/alpha/scale; overall change {overall}" + (" (identical)" if result.identical else ""),
        highlight=False,
    )
    rows = [
        (m.module, str(m.rank_a) if m.rank_a == m.rank_b else f"{m.rank_a}→{m.rank_b}",
         "inf" if m.change is None else relative(m.change), f"{m.cosine:.3f}", f"{m.overlap:.3f}")
        for m in result.modules[:top]
    ]  # fmt: skip
    stdout.print(name_table(stdout.get(), ("module", "rank", "change", "cosine", "overlap"), rows))
    if len(result.modules) > top:
        stdout.print(f"… {len(result.modules) - top} more (--top N, or --json for all)", highlight=False)
    for label, names in (("added", result.added), ("removed", result.removed)):
        if names:
            line = f"{label} ({len(names)}): {', '.join(names)}"
            stdout.print(line if len(line) <= width else line[: width - 1] + "…", highlight=False)
    full = len(result.full_added) + len(result.full_removed) + len(result.full_changed)
    if full:
        stdout.print(f"full tensors: {len(result.full_added)} added, {len(result.full_removed)} removed, "
                     f"{len(result.full_changed)} changed", highlight=False)  # fmt: skip
