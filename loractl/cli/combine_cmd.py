"""`loractl combine`: weighted sums of adapters (cat, svd), PEFT's linear mix, TIES and DARE."""

from __future__ import annotations

import click

from ..choices import COMBINE_METHODS, MAJORITY_SIGNS
from ._algebra import load_inputs, save_and_report
from ._device import device_option
from ._input_options import Inputs, input_options
from ._output_options import Target, output_options


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "--method",
    type=click.Choice(COMBINE_METHODS),
    default="svd",
    show_default=True,
    help="How to combine (see docs/combine.md).",
)
@click.option("--weight", "weights", type=float, multiple=True, help="One per adapter, in order (default 1.0 each).")
@click.option("--rank", type=int, default=None, help="Output rank (svd/ties/dare; default: largest input rank).")
@click.option("--energy", type=float, default=None, help="Smallest rank keeping this share of ‖ΔW‖²_F instead.")
@click.option("--max-rank", type=int, default=None, help="Upper bound for --energy.")
@click.option("--density", type=float, default=None, help="ties/dare: fraction of each ΔW's entries kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the random drop.")
@click.option(
    "--majority-sign",
    type=click.Choice(MAJORITY_SIGNS),
    default="total",
    show_default=True,
    help="ties/dare_ties: elect the sign by summed values or by counts.",
)
@click.option("--allow-base-mismatch", is_flag=True, help="Accept different base model names (same base).")
@device_option
@output_options()
@input_options()
def command(
    adapters: tuple[str, ...],
    method: str,
    weights: tuple[float, ...],
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    density: float | None,
    seed: int,
    majority_sign: str,
    allow_base_mismatch: bool,
    device: str,
    target: Target,
    inputs: Inputs,
) -> None:
    """Combine ADAPTERS module by module into one adapter; a module missing in one counts as zero.

    \b
    Examples:
      loractl combine a b -o ab --method cat                       # exact, rank r_a + r_b
      loractl combine a b -o ab --method svd --weight 0.7 --weight 0.3 --rank 16
      loractl combine a b c -o abc --method ties --density 0.5 --rank 16
    """
    from ..ops.combine import CombineOptions, combine
    from ..ops.lowrank import RankRule

    rule = (
        RankRule(rank=rank, energy=energy, max_rank=max_rank)
        if (rank, energy, max_rank) != (None, None, None)
        else None
    )
    options = CombineOptions(
        method=method,
        weights=weights or None,
        rule=rule,
        density=density,
        seed=seed,
        majority_sign=majority_sign,
        allow_base_mismatch=allow_base_mismatch,
    )
    sources = load_inputs(list(adapters), inputs)
    save_and_report(combine(sources, options, device=device), target)
