"""What combine, resize and rescale share on the command line: reading the inputs, saving, the report
(their output options are `_output_options`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..patterns import natural_key
from ._output import emit_json, stdout, warn
from ._text import budget_line, name_table, relative

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..ops.algebra_result import AlgebraResult
    from ._input_options import Inputs
    from ._output_options import Target

F = TypeVar("F", bound=Callable[..., Any])


def load_inputs(paths: list[str], inputs: Inputs) -> list[Adapter]:
    """The input adapters (the output was checked by `output_options`)."""
    from ..formats import load_adapter

    return [load_adapter(p, format=inputs.format, options=inputs.options(p)) for p in paths]


def save_and_report(
    result: AlgebraResult,
    target: Target,
    render: Callable[[list[dict[str, Any]], str, str], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the result in the input's format (or `to_format`) and print the per-module report.

    `render` replaces the rank/error table, and `extra` joins the JSON document, for operations whose
    report is something else (rescale: the old and new scales).
    """
    from ..formats import FORMATS, save_adapter

    output, to_format, force, as_json = target.output, target.to_format, target.force, target.as_json
    source = result.adapter.meta.source_format
    fmt = to_format or (source if source is not None and source in FORMATS else "peft")
    save_adapter(result.adapter, output, format=fmt, force=force)
    for message in result.warnings:
        warn(message)
    if as_json:
        emit_json({"output": output, "format": fmt, **result.to_dict(), **(extra or {})})
        return
    (render or _render)([vars(r) for r in result.report], output, fmt)
    if result.budget is not None:
        stdout.print(budget_line(result.budget), highlight=False)


def _render(rows: list[dict[str, Any]], output: str, fmt: str) -> None:
    table = [
        (r["module"], str(r["rank_in"]), str(r["rank_out"]), relative(r["rel_error"]))
        for r in sorted(rows, key=lambda r: natural_key(r["module"]))
    ]
    stdout.print(name_table(stdout.get(), ("module", "rank in", "rank out", "rel. error"), table))
    worst = max((r["rel_error"] for r in rows), default=0.0)
    ranks = sorted({r["rank_out"] for r in rows})
    span = f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0] if ranks else 0)
    stdout.print(f"wrote {output} ({fmt}, {len(rows)} modules, rank {span}, max rel. error {relative(worst)})")
