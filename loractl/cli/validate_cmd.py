"""`loractl validate`: CI-friendly checks of many adapter files."""

from __future__ import annotations

import os
import sys

import click

from ._input_options import Inputs, input_options
from ._output import progress, stdout


@click.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option(
    "--format",
    "output",
    type=click.Choice(["text", "json", "github"]),
    default="text",
    show_default=True,
    help="Report style; github prints workflow annotations.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--strict", is_flag=True, help="Warnings fail too.")
@click.option(
    "--target",
    type=click.Choice(["peft", "llamacpp", "mlx", "diffusers", "kohya", "vllm"]),
    default=None,
    help="Also report what this consumer would refuse or silently drop.",
)
@input_options()
def command(
    paths: tuple[str, ...],
    output: str,
    as_json: bool,
    strict: bool,
    target: str | None,
    inputs: Inputs,
) -> None:
    """Check adapters: structure, config vs tensors, NaN/Inf, content hash, and fit to a base.

    Exit 0 when clean, 1 when something fails (warnings only with --strict), 2 on usage errors
    (a path that does not exist among them: every path is still reported).

    \b
    Examples:
      loractl validate fixtures/adapters/*
      loractl validate adapter/ --base fixtures/tiny-llama --format github --strict
      loractl validate fixtures/adapters/tiny-dora --target llamacpp
    """
    from ..validation import validate_adapter

    reports = [
        validate_adapter(p, base=inputs.read.base, format=inputs.format, options=inputs.options(p), target=target)
        for p in progress(paths, len(paths), "validating")
    ]
    from ._validate_render import render

    render(reports, "json" if as_json else output, strict, stdout.get())
    missing = any(not os.path.lexists(p) for p in paths)
    sys.exit(2 if missing else 1 if any(r.failed(strict) for r in reports) else 0)
