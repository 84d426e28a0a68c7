"""`loractl inspect`: a rich summary of one adapter, or one JSON document."""

from __future__ import annotations

import sys

import click

from ._input_options import Inputs, input_options
from ._output import emit_json, stdout, wrote_plot


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--stats", is_flag=True, help="Read the data: verify the content hash, add ‖ΔW‖ and NaN/Inf counts.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw rank and ‖ΔW‖ heatmaps to this PNG (implies --stats).",
)
@input_options()
def command(
    path: str,
    as_json: bool,
    stats: bool,
    plot: str | None,
    inputs: Inputs,
) -> None:
    """Show an adapter's format, ranks, scales, targets, size, hash and lineage.

    Without --stats only headers and config are read (fast on multi-GB files). Exit 1 when a
    finding is an error (the report is still printed), 2 on usage errors.

    \b
    Examples:
      loractl inspect fixtures/adapters/tiny-qv
      loractl inspect my-adapter/ --stats --json
      loractl inspect fixtures/adapters/tiny-patterns --plot layers.png
    """
    from ..inspection import inspect_adapter

    if plot:
        from ..plots import check_plot

        check_plot(plot, [path])
    report = inspect_adapter(path, stats=stats or bool(plot), format=inputs.format, options=inputs.options(path))
    if plot:
        from ..plots import plot_inspection

        wrote_plot(plot_inspection(report, plot))
    if as_json:
        emit_json(report.to_dict())
    else:
        from ._inspect_render import render

        render(report, stdout.get())
    if report.failed:
        sys.exit(1)
