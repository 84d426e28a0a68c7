"""`loractl rescale`: multiply ΔW, or re-express it under another alpha."""

from __future__ import annotations

import click

from ._algebra import load_inputs, output_options, save_and_report


@click.command("rescale")
@click.argument("adapter", type=click.Path())
@click.option("--scale", type=float, default=None, help="Multiply every ΔW by this factor.")
@click.option("--alpha", type=float, default=None, help="Set every module's alpha, keeping ΔW (folded into B).")
@output_options
def command(
    adapter: str,
    scale: float | None,
    alpha: float | None,
    output: str,
    to_format: str | None,
    force: bool,
    as_json: bool,
    from_format: str | None,
    allow_pickle: bool,
) -> None:
    """Change ADAPTER's strength (--scale) or its alpha without changing ΔW (--alpha).

    \b
    Examples:
      loractl rescale my-adapter -o half --scale 0.5
      loractl rescale my-adapter -o alpha16 --alpha 16
    """
    from ..errors import UsageError
    from ..ops.rescale import rescale

    if (scale is None) == (alpha is None):
        raise UsageError("give exactly one of --scale and --alpha", hint="--scale 0.5 halves ΔW; --alpha 16 keeps it")
    (source,) = load_inputs([adapter], output, force, from_format, allow_pickle)
    save_and_report(rescale(source, scale=scale, alpha=alpha), output, to_format, force, as_json)
