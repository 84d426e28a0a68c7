"""`loractl extract`: an adapter from a fine-tuned checkpoint, with a per-module report of what was lost."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..patterns import natural_key
from ._device import device_option
from ._output import emit_json, progress, stdout, warn, wrote_plot
from ._output_options import Target, output_options
from ._text import budget_line, name_table, relative

if TYPE_CHECKING:
    from ..ops.extract_factor import ExtractConfig
    from ..ops.extract_plan import ExtractPlan
    from ..ops.extract_report import ExtractReport

F = TypeVar("F", bound=Callable[..., Any])


def extract_config_options(func: F) -> F:
    """--rank, --energy, --budget, --max-rank, --targets, --save-full, --alpha and --dtype, given to the
    command as one `ExtractConfig` (which checks them: `ExtractConfig.check`)."""
    budget_help = "Total size of the factors: N parameters, or bytes like 50MB; ranks chosen together to lose least."
    options = [
        click.option("--rank", type=int, default=None, help="The same rank for every module."),
        click.option("--energy", type=float, default=None,
                     help="Per module, the smallest rank keeping this share of ‖ΔW‖²_F."),
        click.option("--budget", default=None, help=budget_help),
        click.option("--max-rank", type=int, default=None, help="Upper bound for the rank --energy or --budget chooses."),
        click.option("--targets", multiple=True,
                     help="Module pattern to factor (regex on the path or a dotted suffix; repeatable)."),
        click.option("--save-full", multiple=True, help="Module pattern whose tensors are stored whole (modules_to_save)."),
        click.option("--alpha", type=float, default=None, help="LoRA alpha (default: alpha = rank, so scale 1)."),
        click.option("--dtype", default="float32", show_default=True, help="Factor dtype: float32, bfloat16 or float16."),
    ]  # fmt: skip
    names = ("rank", "energy", "budget", "max_rank", "targets", "save_full", "alpha", "dtype")

    @functools.wraps(func)
    def configured(*args: Any, **kwargs: Any) -> Any:
        from ..ops.extract_factor import ExtractConfig

        given = {k: kwargs.pop(k) for k in names}
        given["budget"] = _budget_params(given["budget"], given["dtype"])
        return func(*args, config=ExtractConfig(**given), **kwargs)

    wrapped: Any = configured
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped  # type: ignore[no-any-return]


def _budget_params(budget: str | None, dtype: str) -> int | None:
    """--budget as a parameter count (a size is divided by the factor dtype's width)."""
    if budget is None:
        return None
    from ..io.dtypes import parse_dtype
    from ..io.tensor_bytes import torch_dtype
    from ..ops.budget import parse_budget

    return parse_budget(budget, torch_dtype(parse_dtype(dtype)).itemsize)


@click.command("extract")
@click.argument("base", type=click.Path())
@click.argument("finetuned", type=click.Path())
@output_options(
    to_flags=("--format", "--to"), to_default="peft", to_help="Output format.",
    inputs=("base", "finetuned"), input_kind="checkpoint ", unless="dry_run",
)  # fmt: skip
@extract_config_options
@click.option("--dry-run", is_flag=True, help="Show the plan from the headers; read no tensor data, write nothing.")
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Also draw ΔW's singular-value spectra to this PNG."
)
@device_option
def command(
    base: str, finetuned: str, target: Target, config: ExtractConfig, dry_run: bool, plot: str | None, device: str
) -> None:
    """Extract a LoRA adapter from BASE and FINETUNED checkpoints by truncated SVD of W_ft − W0.

    Every tensor that is not factored (norms, biases, embeddings unless targeted) is listed;
    --save-full keeps such tensors whole so the adapter reproduces them.

    \b
    Examples:
      loractl extract llama-7b llama-7b-chat -o chat-lora --rank 64
      loractl extract base ft -o lora --energy 0.9 --max-rank 128 --save-full 'norm' --json
      loractl extract base ft -o lora --rank 16 --plot spectra.png
      loractl extract base ft -o lora --budget 20MB --dtype bfloat16
      loractl extract v1-5.safetensors finetune.safetensors -o lora.safetensors --rank 32 --format kohya
      loractl extract base.gguf finetune.gguf -o lora --rank 16

    BASE and FINETUNED are Hugging Face checkpoints or GGUF models, in any mix; two single-file
    Stable Diffusion checkpoints give a LoRA with diffusers module names.
    """
    from ..ops import extract as ops
    from ..plots import SpectrumRecorder, check_plot, plot_spectra

    output, as_json = target.output, target.as_json
    if dry_run:
        plan = ops.dry_run(base, finetuned, config)
        return emit_json(plan.to_dict()) if as_json else _render_plan(plan)
    spectra = SpectrumRecorder(2 * (config.rank or config.max_rank or 0)) if plot else None
    if plot:
        check_plot(plot, [base, finetuned, output])
    report = ops.extract(base, finetuned, output, config, format=str(target.to_format), force=target.force,
                         track=lambda items, n: progress(items, n, "extracting"),
                         observe=spectra.observe if spectra else None, device=device)  # fmt: skip
    if plot and spectra:
        wrote_plot(plot_spectra(spectra, report, plot, inputs=[base, finetuned, output]))
    for message in report.warnings:
        warn(message)
    return emit_json(report.to_dict()) if as_json else _render(report)


def _render(report: ExtractReport) -> None:
    from rich.markup import escape

    rows = [
        (m.module, "×".join(map(str, m.shape)), str(m.rank), relative(m.rel_error), f"{m.energy:.4f}",
         relative(m.delta_ratio), m.method)
        for m in sorted(report.modules, key=lambda m: natural_key(m.module))
    ]  # fmt: skip
    headers = ("module", "shape", "rank", "rel error", "energy", "‖ΔW‖/‖W0‖", "svd")
    stdout.print(name_table(stdout.get(), headers, rows, title="extracted modules"))
    lost = report.not_extracted()
    for n in lost:
        stdout.print(f"[yellow]not extracted[/] {escape(f'{n.name}: {n.reason}')}", highlight=False)
    t = report.totals()
    stdout.print(
        f"{t['modules']} modules, rel error {relative(t['rel_error'])}, energy {t['energy']:.4f}; "
        f"{t['saved_full']} saved full, {t['identical']} identical, {t['not_extracted']} changed but not extracted"
        + (" (pass --save-full to keep them)" if lost else ""),
        highlight=False,
    )
    if report.budget is not None:
        stdout.print(budget_line(report.budget), highlight=False)


def _render_plan(plan: ExtractPlan) -> None:
    rows = [
        (e.name, "×".join(map(str, e.shape)), f"{e.action} ({e.kind})" if e.action == "lowrank" else e.action, e.reason)
        for e in sorted(plan.entries, key=lambda e: natural_key(e.name))
    ]
    headers = ("tensor", "shape", "action", "reason")
    stdout.print(name_table(stdout.get(), headers, rows, title="extract plan (from headers)"))
