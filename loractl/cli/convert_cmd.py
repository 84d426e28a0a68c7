"""`loractl convert`: any adapter format to any other, verified by reading the output back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ._input_options import ALPHA_HELP, Inputs, input_options
from ._output import emit_json, stdout, warn
from ._output_options import Target, output_options
from ._text import name_table, relative

if TYPE_CHECKING:
    from ..ops.algebra_result import ModuleChange


@click.command("convert")
@click.argument("adapter", type=click.Path())
@output_options(
    to_help="Target: peft, kohya, diffusers, original, mlx, gguf, ...",
    to_required=True,
    output_help="Output path (file or directory, per format).",
)
@click.option(
    "--allow-loss", is_flag=True, help="Write even if the target cannot hold all of the adapter (recorded as lost)."
)
@click.option("--rank", type=int, default=None, help="Truncate every module to this rank first (as resize does).")
@click.option("--energy", type=float, default=None, help="Truncate each module to keep this share of ‖ΔW‖²_F.")
@click.option("--max-rank", type=int, default=None, help="Upper bound for the rank --energy chooses.")
@click.option("--no-verify", is_flag=True, help="Skip reading the output back and comparing ΔW.")
@input_options(alpha_help=ALPHA_HELP + " Also the target's global alpha.")
def command(
    adapter: str,
    target: Target,
    allow_loss: bool,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    no_verify: bool,
    inputs: Inputs,
) -> None:
    """Convert ADAPTER to another format; every module's scale·B·A is checked after writing.

    A target that cannot hold part of the adapter's effect (DoRA magnitudes, biases, full
    tensors, embedding LoRA) is refused, with the loss measured (--base measures DoRA and
    full tensors); --allow-loss writes it anyway and records the loss.

    LyCORIS LoHa/LoKr files read as the exact LoRA they equal (rank r1·r2, or the product of
    the Kronecker factors' ranks); --rank or --energy truncates every module optimally, the
    error per module in the report (a loss: refused without --allow-loss).

    Diffusion transformers (Flux.1, SD3, Wan, Qwen-Image, LTX-Video, Z-Image) change layout
    with the format: kohya and original hold the original repository's fused q/k/v, diffusers
    the split ones; both ways are exact (fusing parts with their own A stacks them, rank = sum).

    \b
    Examples:
      loractl convert my-lora.safetensors -o my-lora-peft --to peft --base sd15/unet
      loractl convert fixtures/adapters/tiny-qv -o tiny.safetensors --to kohya
      loractl convert mlx-adapters/ -o peft-adapter --to peft
      loractl convert adapters.npz -o peft-adapter --to peft --scale 20
      loractl convert dora-adapter -o d.pt --to loralib --base BASE --allow-loss
      loractl convert loha.safetensors -o peft-r16 --to peft --rank 16 --allow-loss --base sd15/unet
      loractl convert flux-kohya.safetensors -o flux.safetensors --to diffusers
    """
    from ..ops.convert import convert
    from ..ops.lowrank import RankRule

    rule = None
    if rank is not None or energy is not None or max_rank is not None:
        rule = RankRule(rank=rank, energy=energy, max_rank=max_rank)
        rule.check()

    output, as_json = target.output, target.as_json
    report = convert(
        adapter,
        output,
        to=str(target.to_format),
        source_format=inputs.format,
        read_options=inputs.options(adapter),
        allow_loss=allow_loss,
        verify_output=not no_verify,
        force=target.force,
        rank=rule,
    )
    for note in (*report.warnings, *(f"lost: {x.describe()}" for x in report.lost)):
        warn(note)  # exact folds stay silent (they are in --json)
    if as_json:
        emit_json(report.to_dict())
        return
    if report.truncated:
        _print_truncation(report.truncated)
    check = f"max relative ΔW error {relative(report.max_error)}" if report.verified else "not verified (--no-verify)"
    if report.lost:
        check = f"LOSSY (see 'lost:' above); as planned: {check}"
    stdout.print(
        f"{report.source} ({report.source_format}) → {report.output} ({report.target_format}): "
        f"{report.modules} modules, {check}",
        highlight=False,
    )


def _print_truncation(changes: tuple[ModuleChange, ...]) -> None:
    """Per module: rank before → after and the relative error of the truncation."""
    rows = [(c.module, f"{c.rank_in} → {c.rank_out}", relative(c.rel_error)) for c in changes]
    stdout.print(name_table(stdout.get(), ("module", "rank", "rel error"), rows, title="truncation per module"))
