"""`loractl rescale`: multiply ΔW, or re-express it under another alpha."""

from __future__ import annotations

import click

from ._algebra import load_inputs, output_options, save_and_report
from ._input_options import input_options, to_read_options


@click.command("rescale")
@click.argument("adapter", type=click.Path())
@click.option("--to-scale", type=float, default=None, help="Multiply every ΔW by this factor.")
@click.option("--to-alpha", type=float, default=None, help="Set every module's alpha, keeping ΔW (folded into B).")
@output_options
@input_options()
def command(
    adapter: str,
    to_scale: float | None,
    to_alpha: float | None,
    output: str,
    to_format: str | None,
    force: bool,
    as_json: bool,
    source_format: str | None,
    allow_pickle: bool,
    alpha: float | None,
    scale: float | None,
    base: str | None,
) -> None:
    """Change ADAPTER's strength (--to-scale) or its alpha without changing ΔW (--to-alpha).

    Without --to-scale and --to-alpha, --scale and --alpha keep their old meaning and name the
    target; with either, they are what the input needs to be read (an old mlx .npz, loralib).

    \b
    Examples:
      loractl rescale my-adapter -o half --to-scale 0.5
      loractl rescale my-adapter -o alpha16 --to-alpha 16
      loractl rescale adapters.npz -o half --to-scale 0.5 --scale 20
    """
    from ..errors import UsageError
    from ..ops.rescale import rescale

    if to_scale is None and to_alpha is None:  # the old spelling: --scale / --alpha are the target
        to_scale, to_alpha, scale, alpha = scale, alpha, None, None
    if (to_scale is None) == (to_alpha is None):
        raise UsageError(
            "give exactly one of --to-scale and --to-alpha", hint="--to-scale 0.5 halves ΔW; --to-alpha 16 keeps it"
        )
    options = to_read_options(base, alpha, scale, allow_pickle)
    (source,) = load_inputs([adapter], output, force, source_format, options)
    save_and_report(rescale(source, scale=to_scale, alpha=to_alpha), output, to_format, force, as_json)
