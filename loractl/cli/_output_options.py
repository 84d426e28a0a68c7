"""The output options of every command that writes an adapter, defined once: -o/--output, the format
(--to), --force and --json, given to the command as one `Target` and checked before any work.

The checks run before the command reads anything or imports torch: a known format, inputs that exist,
and an output that is none of them and is absent unless --force (`io.atomic.check_output`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Target:
    """Where and how the result goes: -o/--output, --to (None: the input's format), --force, --json."""

    output: str
    to_format: str | None
    force: bool
    as_json: bool


def output_options(
    *,
    to_help: str = "Output format (default: the input's).",
    to_required: bool = False,
    to_default: str | None = None,
    to_flags: tuple[str, ...] = ("--to",),
    output_help: str = "Output adapter path.",
    inputs: tuple[str, ...] = ("adapter", "adapters"),
    input_kind: str = "",
    unless: str | None = None,
) -> Callable[[F], F]:
    """Add -o/--output, the format option (`to_flags`), --force and --json; the command gets `target: Target`.

    `inputs` names the command's input arguments (checked to exist, `input_kind` naming them in the
    error, e.g. "checkpoint "); with `unless` (a flag of the command, e.g. dry_run) the output is not
    checked when that flag is set.
    """
    options = [
        click.option("-o", "--output", required=True, type=click.Path(), help=output_help),
        click.option(
            *to_flags,
            "to_format",
            default=to_default,
            required=to_required,
            metavar="FORMAT",
            help=to_help,
            show_default=to_default is not None,
        ),
        click.option("--force", is_flag=True, help="Replace the output if it exists."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document."),
    ]

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            target = Target(*(kwargs.pop(k) for k in ("output", "to_format", "force", "as_json")))
            _check(target, [p for name in inputs if name in kwargs for p in _paths(kwargs[name])], input_kind,
                   check_output=not (unless and kwargs.get(unless)))  # fmt: skip
            return command(*args, target=target, **kwargs)

        wrapped: Any = checked
        for option in reversed(options):
            wrapped = option(wrapped)
        return wrapped  # type: ignore[no-any-return]

    return decorate


def _paths(value: Any) -> list[str]:
    return list(value) if isinstance(value, tuple) else [value]


def _check(target: Target, inputs: list[str], kind: str, *, check_output: bool) -> None:
    from ..errors import InputNotFoundError
    from ..formats import check_format
    from ..io.atomic import check_output as check_output_path

    if target.to_format is not None:
        check_format(target.to_format, "target ")
    for path in inputs:
        InputNotFoundError.check(path, kind)
    if check_output:
        check_output_path(target.output, inputs, force=target.force)
