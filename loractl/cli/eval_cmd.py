"""`loractl eval`: loss and perplexity of a base alone and with each adapter, on train's data formats."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._input_options import Inputs, input_options
from ._output import emit_json, progress, stdout, warn
from ._text import adapter_labels, fit_path, name_table

if TYPE_CHECKING:
    from ..train.evaluation import EvalReport


@click.command("eval")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1)
@click.option("--data", required=True, type=click.Path(), help="JSONL: text, prompt/completion or chat messages.")
@click.option("--prompt", default=None, help="Also greedy-complete this prompt with each model.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Length of the --prompt completion.")
@click.option("--no-template", is_flag=True, help="Send --prompt as is, not as a user turn of the chat template.")
@click.option("--max-len", type=int, default=512, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per forward pass.")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option(
    "--allow-base-mismatch", is_flag=True, help="Evaluate even if an adapter records another base's fingerprint."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
@input_options(base=False)
def command(
    base: str, adapters: tuple[str, ...], data: str, prompt: str | None, max_new_tokens: int, no_template: bool,
    max_len: int, batch_size: int, device: str | None, allow_base_mismatch: bool, as_json: bool, inputs: Inputs,
) -> None:  # fmt: skip
    """Score DATA under BASE alone and under BASE + each ADAPTER: mean loss per label token and perplexity.

    ADAPTERs are paths or registry versions (hf://owner/name@v1, file:///DIR/owner/name@v2), so
    this is how to pick between two versions. Loss is taken where `train` takes it (completions,
    assistant turns of chat lines, every token of text lines).

    \b
    Examples:
      loractl eval ./llama run/adapter --data val.jsonl
      loractl eval ./llama hf://alice/lora@v1 hf://alice/lora@v2 --data val.jsonl --json
      loractl eval ./llama my-adapter --data val.jsonl --prompt "Name three primes."
    """
    from ..errors import InputNotFoundError
    from ..formats import load_adapter
    from ..remote.refs import check_paths, local_copy

    InputNotFoundError.check(data, "data file ")  # before seconds of loading (and of importing torch)
    check_paths(adapters)
    on_base = Path(base) if Path(base).is_dir() else None  # names resolve on BASE
    from ..train.data import require_data_file
    from ..train.evaluation import evaluate_adapters

    with ExitStack() as stack:  # pulled versions live until scored: an adapter that adds tokens keeps its tokenizer
        dirs = {p: stack.enter_context(local_copy(p)) for p in adapters}
        loaded = [(p, load_adapter(dirs[p], format=inputs.format, options=replace(inputs.options(p), base=on_base)))
                  for p in adapters]  # fmt: skip
        require_data_file(data)
        report = evaluate_adapters(base, loaded, data, max_len=max_len, batch_size=batch_size, prompt=prompt,
                                   max_new_tokens=max_new_tokens, chat_template=not no_template,
                                   device=device or _default_device(), allow_base_mismatch=allow_base_mismatch,
                                   track=lambda items, n, name: progress(items, n, f"eval {name}"),
                                   adapter_dirs=dirs)  # fmt: skip
    for note in report.base_notes:
        warn(note)
    return emit_json(report.to_dict()) if as_json else _render(report)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _render(report: EvalReport) -> None:
    width = stdout.get().width
    counts = f": {report.examples} examples, {report.tokens} label tokens"
    stdout.print(fit_path(report.data, width - len(counts)) + counts, highlight=False)
    labels = ["base", *adapter_labels([row.name for row in report.rows[1:]])]
    base = report.rows[0].loss
    rows = [
        (label, f"{row.loss:.4f}", f"{row.perplexity:.3f}", "" if row.adapter is None else f"{row.loss - base:+.4f}")
        for label, row in zip(labels, report.rows, strict=True)
    ]
    stdout.print(name_table(stdout.get(), ("model", "loss", "perplexity", "Δ loss"), rows))
    for label, row in zip(labels, report.rows, strict=True):
        if row.own_tokenizer:
            note = f": adds tokens, scored with its own tokenizer ({row.tokens} label tokens)"
            stdout.print(fit_path(label, width - len(note)) + note, highlight=False)
    if report.prompt is not None:
        stdout.print(f"prompt: {report.prompt}", highlight=False)
        for label, row in zip(labels, report.rows, strict=True):
            stdout.print(f"[bold]{label}[/]: {row.completion}", highlight=False)
