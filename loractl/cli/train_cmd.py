"""`loractl train`: flags → `TrainConfig` → `loractl.train.train_adapter`, with a progress bar."""

from __future__ import annotations

import os
import re
from typing import Any

import click

from ..choices import BASE_DTYPES, DEVICES, INITS, PRECISIONS, QUANTIZE, SCHEDULES
from ._output import emit_json, stderr, stdout

_SUFFIXES = re.compile(r"[\w.]+(,[\w.]+)*")


def parse_targets(value: str | None) -> tuple[str, ...] | str | None:
    """`q_proj,v_proj` → suffixes; `all-linear` and anything else (a regex) stay a string."""
    if value is None or value == "all-linear" or not _SUFFIXES.fullmatch(value):
        return value
    return tuple(value.split(","))


@click.command("train", context_settings={"show_default": False})
@click.option(
    "--base", required=True, help="Base model: a transformers directory (config.json + safetensors + tokenizer)."
)
@click.option("--data", required=True, type=click.Path(),
              help="Training data: JSONL (text, prompt+completion, or messages), parquet/arrow/csv/json, a "
              "save_to_disk directory, or a Hub dataset id.")  # fmt: skip
@click.option("--data-split", help="Split of a Hub or saved dataset [train].")
@click.option("--data-config", help="Config (subset) of a Hub dataset.")
@click.option("--data-columns", help="Rename columns into the row shapes: text=body, messages=conversation, ...")
@click.option("--data-streaming", is_flag=True, help="Read rows as the source yields them (no datasets cache).")
@click.option(
    "--report-to",
    default="none",
    show_default=True,
    help="Also log metrics to tensorboard, wandb (offline without a key), or both: tensorboard,wandb.",
)
@click.option("--eval-split", default="test", show_default=True, help="Split of --eval-data when it is a dataset.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter directory to write (PEFT format).")
@click.option("--eval-data", type=click.Path(), help="Held-out data for eval loss (the forms --data takes).")
@click.option("--rank", type=int, help="LoRA rank r [8].")
@click.option("--alpha", type=float, help="LoRA alpha; scale = alpha/r [16].")
@click.option("--targets", help="Suffixes (q_proj,v_proj), all-linear, or a regex over module paths [q_proj,v_proj].")
@click.option("--exclude", help="Suffixes or a regex of modules to leave out.")
@click.option("--rslora", is_flag=True, default=None, help="Scale alpha/sqrt(r) (rsLoRA).")
@click.option(
    "--dora", is_flag=True, default=None, help="DoRA: also train a magnitude per output row (PEFT's use_dora)."
)
@click.option("--train-modules", help="Modules trained in full and saved whole (PEFT's modules_to_save): lm_head,...")
@click.option("--add-tokens", help="Comma list of tokens to add to the tokenizer; the embeddings are resized.")
@click.option("--chat-template", type=click.Path(), help="Jinja chat template to use; <|tokens|> it needs are added.")
@click.option("--dropout", type=float, help="Dropout on the LoRA path [0].")
@click.option("--init", metavar="[" + "|".join(INITS) + "|pissa_niter_N]",
              help="Initialization [kaiming]; pissa/olora start from the base's SVD/QR and save a rank-2r LoRA "
              "for the unmodified base.")  # fmt: skip
@click.option("--lora-plus-ratio", type=float, help="LoRA+: B's learning rate is --lr times this (e.g. 16).")
@click.option("--lora-plus-embedding-lr", type=float, help="LoRA+: the embedding LoRA's learning rate [1e-6].")
@click.option("--steps", type=int, help="Optimizer steps [100].")
@click.option("--epochs", type=float, help="Passes over the data (instead of --steps).")
@click.option("--lr", type=float, help="Peak learning rate [2e-4].")
@click.option("--warmup", type=int, help="Linear warmup steps [0].")
@click.option("--schedule", type=click.Choice(SCHEDULES), help="LR schedule [cosine].")
@click.option("--batch-size", type=int, help="Examples per micro-batch per process [8].")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option("--max-len", type=int, help="Truncate examples to this many tokens [512].")
@click.option("--packing", is_flag=True, default=None, help="Pack short examples into rows of --max-len.")
@click.option("--grad-checkpointing", is_flag=True, default=None, help="Recompute activations in backward.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Autocast precision [fp32].")
@click.option("--base-dtype", type=click.Choice(BASE_DTYPES), help="Hold the frozen base in this dtype [its own].")
@click.option("--quantize", type=click.Choice(QUANTIZE), help="Load the base quantized by bitsandbytes (QLoRA).")
@click.option("--device", type=click.Choice(DEVICES), help="Where to train [auto: CUDA if present].")
@click.option("--compile", is_flag=True, default=None, help="torch.compile each decoder layer.")
@click.option("--seed", type=int, help="Seed for A's init, data order and dropout [0].")
@click.option("--save-every", type=int, help="Checkpoint every N steps into OUTPUT.train/checkpoints [0: never].")
@click.option(
    "--log-every", type=int, help="Log loss to metrics.jsonl (and, off a terminal, stderr) every N steps [1]."
)
@click.option("--eval-every", type=int, help="Eval loss every N steps [0: at the end].")
@click.option("--resume", type=click.Path(), help="Continue from a checkpoint (a step-000020 directory or its parent).")
@click.option("--config", "config_file", type=click.Path(), help="JSON or TOML file of settings; flags override it.")
@click.option("--nproc", type=click.IntRange(min=1), help="Launch N processes with torchrun (DDP).")
@click.option("--fsdp", is_flag=True, default=None,
              help="Shard the base over the processes (FSDP) instead of replicating it; checkpoints as DCP shards.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing output and its checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.pass_context
def command(ctx: click.Context, /, base: str, data: str, output: str, eval_data: str | None, resume: str | None,
            config_file: str | None, nproc: int | None, force: bool, as_json: bool, data_split: str | None,
            data_config: str | None, data_columns: str | None, data_streaming: bool, eval_split: str,
            report_to: str, **settings: Any) -> None:  # fmt: skip
    """Train a LoRA adapter on a transformers base and save it in PEFT format.

    \b
    Examples:
      loractl train --base fixtures/tiny-llama --data fixtures/data/train.jsonl -o out --lr 1e-2 --steps 60
      loractl train --base BASE --data chat.jsonl -o out --targets all-linear --rank 16 --nproc 2
    """
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ._torchrun import COMMAND_ARGS, launch

        ctx.exit(launch(nproc, ctx.meta[COMMAND_ARGS], debug=ctx.obj["debug"]))
    _check_paths(output, data, eval_data, force=force or resume is not None)
    from ..data_sources import DataOptions, parse_columns
    from ..train import train_adapter
    from ..train.config import load_config
    from ..train.reporting import parse_report_to

    options = DataOptions(data_split or "train", data_config, data_streaming, parse_columns(data_columns))
    settings.update(targets=parse_targets(settings["targets"]), exclude=parse_targets(settings["exclude"]),
                    train_modules=_comma_list(settings["train_modules"]), add_tokens=_comma_list(settings["add_tokens"]))  # fmt: skip
    config = load_config(config_file, settings)
    with _Progress(output) as progress:
        summary = train_adapter(base, data, output, config, eval_data=eval_data, resume=resume, force=force,
                                callbacks=[progress], data_options=options, eval_split=eval_split,
                                report_to=parse_report_to(report_to))  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        _report(summary, as_json)
    if summary.result.interrupted:
        ctx.exit(130)


def _comma_list(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _check_paths(output: str, data: str, eval_data: str | None, *, force: bool) -> None:
    """What train checks again, checked before the base loads: the data exist (a file, a dataset directory or a
    Hub id), the output does not unless --force (or --resume)."""
    from ..data_sources import check_source
    from ..io.atomic import check_output

    for path in (data, eval_data) if eval_data else (data,):
        check_source(path)
    check_output(output, [], force=force)


def _report(summary: Any, as_json: bool) -> None:
    r = summary.result
    if as_json:
        emit_json(summary.to_dict())
    elif r.finished_before:
        stdout.print(f"the run was already finished: {r.checkpoint} is at its last step ({r.steps}); "
                     "nothing was written", highlight=False)  # fmt: skip
    elif r.interrupted and r.checkpoint is None:
        stderr.print(f"interrupted at step {r.steps}; no checkpoint was written", highlight=False)
    elif r.interrupted:
        stderr.print(f"interrupted at step {r.steps}; resume with --resume {r.checkpoint}", highlight=False)
    else:
        losses = f"train loss {r.train_loss:.4f}" + (
            f", eval loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""
        )
        stdout.print(f"wrote {summary.output}: {r.steps} steps, {losses}, {r.seconds:.1f} s", highlight=False)


class _Progress:
    """A Callback (duck-typed, so this module needs no torch): trainable count, then a progress bar on a
    terminal, or one loss line per logged step (every --log-every) when stderr is a pipe or a log file."""

    def __init__(self, output: str) -> None:
        self.output = output

    def __enter__(self) -> _Progress:
        self.bar: Any = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def on_start(self, info: dict[str, Any]) -> None:
        stderr.print(f"trainable parameters: {info['trainable']:,} of {info['total']:,} ({100 * info['ratio']:.2f}%)",
                     highlight=False)  # fmt: skip
        from ..train.job import run_dir_of

        stderr.print(f"metrics: {run_dir_of(self.output) / 'metrics.jsonl'}", highlight=False)
        self.steps = info["steps"]
        if stderr.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                       TimeRemainingColumn())  # fmt: skip
            self.bar = Progress(*columns, console=stderr.get(), transient=True)
            self.task = self.bar.add_task("train", total=info["steps"], completed=info["start_step"], stats="")
            self.bar.start()

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        stats = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=metrics["step"], stats=stats)
        else:
            stderr.print(f"step {metrics['step']}/{self.steps}: {stats}", highlight=False)
        return None

    def on_eval(self, metrics: dict[str, Any]) -> None:
        stderr.print(f"step {metrics['step']}: eval loss {metrics['eval_loss']:.4f}", highlight=False)

    def on_save(self, path: Any, step: int) -> None:
        return None
