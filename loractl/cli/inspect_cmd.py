"""`loractl inspect`: a rich summary of one adapter, or one JSON document."""

from __future__ import annotations

import click

from ._output import emit_json, stdout


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option(
    "--stats",
    is_flag=True,
    help="Read the tensor data: verify the content hash, add per-module ‖ΔW‖ and NaN/Inf counts.",
)
@click.option("--from", "format", default=None, help="Input format (default: detected).")
@click.option("--allow-pickle", is_flag=True, help="Allow legacy pickle weights (loaded with weights_only=True).")
def command(path: str, as_json: bool, stats: bool, format: str | None, allow_pickle: bool) -> None:
    """Show an adapter's format, ranks, scales, targets, size, hash and lineage.

    Without --stats only headers and config are read (fast on multi-GB files).

    \b
    Examples:
      loractl inspect fixtures/adapters/tiny-qv
      loractl inspect my-adapter/ --stats --json
    """
    from ..inspection import inspect_adapter

    report = inspect_adapter(path, stats=stats, format=format, allow_pickle=allow_pickle)
    if as_json:
        emit_json(report.to_dict())
    else:
        from ._inspect_render import render

        render(report, stdout)
