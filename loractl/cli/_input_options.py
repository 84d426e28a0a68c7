"""The options of every command that reads an adapter, defined once: --from, --allow-pickle, --alpha,
--scale and --base, so that a hint naming one of them is right on every command that prints it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..formats.options import ReadOptions

F = TypeVar("F", bound=Callable[..., Any])

ALPHA_HELP = "Alpha for formats that do not store one (loralib, torchtune .pt)."


@dataclass(frozen=True)
class Inputs:
    """How to read the command's adapters: the format (`--from`; None: detected) and `ReadOptions`."""

    format: str | None
    read: ReadOptions


def input_options(*, base: bool = True, alpha_help: str = ALPHA_HELP) -> Callable[[F], F]:
    """Add --from, --allow-pickle, --alpha, --scale and --base; the command gets them as `inputs: Inputs`.

    `base=False` where BASE is an argument (merge): the readers then get that base.
    """
    options = [
        click.option(
            "--from", "source_format", default=None, metavar="FORMAT", help="Input format (default: detected)."
        ),
        click.option("--allow-pickle", is_flag=True, help="Allow pickle inputs (loaded with weights_only=True)."),
        click.option("--alpha", type=float, default=None, help=alpha_help),
        click.option(
            "--scale", type=float, default=None, help="Scale for formats that do not store one (old mlx .npz)."
        ),
    ]
    if base:
        help = "Base checkpoint: resolves kohya/GGUF names, RoPE head counts, loralib widths."
        options.append(click.option("--base", type=click.Path(exists=True), default=None, help=help))

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def with_inputs(*args: Any, **kwargs: Any) -> Any:
            from ..formats import check_format
            from ..formats.options import ReadOptions

            if kwargs["source_format"] is not None:
                check_format(kwargs["source_format"])  # before the command imports torch

            path = kwargs.pop("base") if base else None  # merge keeps its BASE argument
            read = ReadOptions(
                allow_pickle=kwargs.pop("allow_pickle"),
                base=Path(path) if path else None,
                alpha=kwargs.pop("alpha"),
                scale=kwargs.pop("scale"),
            )
            return command(*args, inputs=Inputs(kwargs.pop("source_format"), read), **kwargs)

        wrapped: Any = with_inputs
        for option in reversed(options):
            wrapped = option(wrapped)
        return wrapped  # type: ignore[no-any-return]

    return decorate
