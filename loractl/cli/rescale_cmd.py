"""`loractl rescale`: multiply ΔW, or re-express it under another alpha."""

from __future__ import annotations

from dataclasses import replace

import click

from ._algebra import load_inputs, save_and_report
from ._input_options import Inputs, input_options
from ._output_options import Target, output_options


@click.command("rescale")
@click.argument("adapter", type=click.Path())
@click.option("--to-scale", type=float, default=None, help="Multiply every ΔW by this factor.")
@click.option("--to-alpha", type=float, default=None, help="Set every module's alpha, keeping ΔW (folded into B).")
@output_options()
@input_options(per_input=False)
def command(
    adapter: str,
    to_scale: float | None,
    to_alpha: float | None,
    target: Target,
    inputs: Inputs,
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
        to_scale, to_alpha = inputs.read.scale, inputs.read.alpha
        inputs = replace(inputs, read=replace(inputs.read, scale=None, alpha=None))
    if (to_scale is None) == (to_alpha is None):
        raise UsageError(
            "give exactly one of --to-scale and --to-alpha", hint="--to-scale 0.5 halves ΔW; --to-alpha 16 keeps it"
        )
    (source,) = load_inputs([adapter], inputs)
    result = rescale(source, scale=to_scale, alpha=to_alpha)
    changes = {
        name: (m.scale, result.adapter.modules[name].scale, m.alpha, result.adapter.modules[name].alpha)
        for name, m in source.modules.items()
    }
    scales = [{"module": n, "scale": [c[0], c[1]], "alpha": [c[2], c[3]]} for n, c in changes.items()]
    save_and_report(
        result,
        target,
        render=lambda _rows, out, fmt: _render(changes, out, fmt),
        extra={"scales": scales},  # [old, new] per module
    )


def _render(changes: dict[str, tuple[float, float, float | None, float | None]], output: str, fmt: str) -> None:
    """Old → new scale (and alpha) per group of modules: what rescale changed; ΔW's shape is untouched."""
    from ..patterns import summarize
    from ._output import stdout
    from ._text import name_table

    def arrow(old: float | None, new: float | None) -> str:
        return "-" if old is None or new is None else (f"{old:.6g}" if old == new else f"{old:.6g} → {new:.6g}")

    rows = [(p, arrow(a[0], a[1]), arrow(a[2], a[3]), str(n)) for p, a, n in summarize(changes)]
    stdout.print(name_table(stdout.get(), ("modules", "scale", "alpha", "count"), rows))
    stdout.print(f"wrote {output} ({fmt}, {len(changes)} modules)", highlight=False)
