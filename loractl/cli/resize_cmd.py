"""`loractl resize`: optimal per-module truncation from the factors, fixed or dynamic rank."""

from __future__ import annotations

import click

from ._algebra import load_inputs, save_and_report
from ._device import device_option
from ._input_options import Inputs, input_options
from ._output_options import Target, output_options


@click.command("resize")
@click.argument("adapter", type=click.Path())
@click.option("--rank", type=int, default=None, help="Keep this rank (modules below it are kept as they are).")
@click.option("--energy", type=float, default=None, help="Keep the smallest rank with this share of ‖ΔW‖²_F.")
@click.option("--fro", type=float, default=None, help="kohya sv_fro: keep this share of ‖ΔW‖_F (= --energy F²).")
@click.option("--ratio", type=float, default=None, help="kohya sv_ratio: keep σ > σ_max / RATIO.")
@click.option("--cumulative", type=float, default=None, help="kohya sv_cumulative: keep this share of Σσ.")
@click.option("--max-rank", type=int, default=None, help="Upper bound for the dynamic rules.")
@click.option(
    "--budget",
    default=None,
    help="Total size of the factors: N parameters, or bytes like 50MB; ranks chosen together to lose least.",
)
@device_option
@output_options()
@input_options()
def command(
    adapter: str,
    rank: int | None,
    energy: float | None,
    fro: float | None,
    ratio: float | None,
    cumulative: float | None,
    max_rank: int | None,
    budget: str | None,
    device: str,
    target: Target,
    inputs: Inputs,
) -> None:
    """Shrink every module of ADAPTER to a lower rank, optimally, reporting rank and error per module.

    \b
    Examples:
      loractl resize my-adapter -o my-adapter-r8 --rank 8
      loractl resize my-adapter -o small --energy 0.99 --max-rank 32 --json
      loractl resize my-adapter -o small --budget 4MB
    """
    from ..errors import UsageError
    from ..ops.budget import parse_budget
    from ..ops.lowrank import RankRule, common_dtype
    from ..ops.resize import resize, resize_to_budget

    _check_one_rule(rank=rank, energy=energy, fro=fro, ratio=ratio, cumulative=cumulative, budget=budget)
    if budget is not None and max_rank is not None:
        raise UsageError("--budget chooses every rank itself; give it alone", hint="drop --max-rank")
    rule = RankRule(
        rank=rank, energy=fro**2 if fro is not None else energy, ratio=ratio, cumulative=cumulative, max_rank=max_rank
    )
    if budget is None:
        rule.check()
    (source,) = load_inputs([adapter], inputs)
    if budget is None:
        return save_and_report(resize(source, rule, device=device), target)
    params = parse_budget(budget, common_dtype(list(source.modules.values())).itemsize)
    save_and_report(resize_to_budget(source, params), target)


def _check_one_rule(**rules: object) -> None:
    """Exactly one of resize's rules (--fro and --budget are not rank rules of the library: checked here)."""
    from ..errors import UsageError

    given = [f"--{name}" for name, value in rules.items() if value is not None]
    if len(given) != 1:
        raise UsageError(
            f"give exactly one of {', '.join(f'--{name}' for name in rules)} (got {', '.join(given) or 'none'})",
            hint="e.g. --rank 16, --energy 0.99 with an optional --max-rank, or --budget 4MB",
        )
