"""`loractl inspect`: a rich summary of one adapter, or one JSON document."""

from __future__ import annotations

import click

from ._output import emit_json, stdout
from ._read_options import read_options, to_read_options


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--stats", is_flag=True, help="Read the data: verify the content hash, add ‖ΔW‖ and NaN/Inf counts.")
@click.option("--base", type=click.Path(exists=True), default=None, help="Base checkpoint, for formats that need it.")
@read_options
def command(
    path: str,
    as_json: bool,
    stats: bool,
    base: str | None,
    source_format: str | None,
    alpha: float | None,
    scale: float | None,
    allow_pickle: bool,
) -> None:
    """Show an adapter's format, ranks, scales, targets, size, hash and lineage.

    Without --stats only headers and config are read (fast on multi-GB files).

    \b
    Examples:
      loractl inspect fixtures/adapters/tiny-qv
      loractl inspect my-adapter/ --stats --json
    """
    from ..inspection import inspect_adapter

    options = to_read_options(base, alpha, scale, allow_pickle)
    report = inspect_adapter(path, stats=stats, format=source_format, options=options)
    if as_json:
        emit_json(report.to_dict())
    else:
        from ._inspect_render import render

        render(report, stdout)
