"""What combine, resize and rescale share on the command line: output options, saving, the report."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..patterns import natural_key
from ._output import emit_json, stdout, warn
from ._text import budget_line, name_table, relative

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..ops.algebra_result import AlgebraResult
    from ._input_options import Inputs

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Target:
    """Where and how the result goes: -o/--output, --to, --force, --json."""

    output: str
    to_format: str | None
    force: bool
    as_json: bool


def output_options(func: F) -> F:
    """-o/--output, --to, --force, --json, passed to the command as one `target: Target` (the inputs'
    options come from `input_options`)."""
    options = [
        click.option("-o", "--output", required=True, type=click.Path(), help="Output adapter path."),
        click.option("--to", "to_format", default=None, help="Output format (default: the input's)."),
        click.option("--force", is_flag=True, help="Replace the output if it exists."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document."),
    ]

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check_output_options(kwargs)
        target = Target(*(kwargs.pop(k) for k in ("output", "to_format", "force", "as_json")))
        return func(*args, target=target, **kwargs)

    wrapped: Any = checked
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped  # type: ignore[no-any-return]


def check_output_options(params: dict[str, Any]) -> None:
    """Before the command reads anything or imports torch: a known --to, inputs (ADAPTER or ADAPTERS)
    that exist, and an output that is none of them and is absent unless --force."""
    from ..errors import InputNotFoundError
    from ..formats import check_format
    from ..io.atomic import check_output

    if params["to_format"] is not None:
        check_format(params["to_format"], "target ")
    inputs = params["adapters"] if "adapters" in params else [params["adapter"]]
    for path in inputs:
        InputNotFoundError.check(path)
    check_output(params["output"], inputs, force=params["force"])


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
