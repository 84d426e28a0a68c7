"""`train_adapter`: base directory + JSONL files → a trained PEFT-format adapter with lineage.

Everything a user can get wrong (paths, config, data, targets) is checked before the first
step. Checkpoints and `metrics.jsonl` go to `OUTPUT.train/` beside the adapter, one run at a time (`run_lock`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..data_sources import DataOptions
from ..errors import InputNotFoundError, UsageError
from ..io.atomic import check_writable, ensure_distinct, refuse_existing
from ..io.checkpoint import Checkpoint
from ..lineage import new_entry
from . import distributed
from .base import load_base
from .callbacks import Hooks, MetricsLog
from .config import TrainConfig, is_residual_init
from .data import Dataset, load_dataset, require_data_file
from .export import adapter_from_model
from .inject import Injection, inject
from .loop import TrainResult, train
from .reporting import check_available, reporters
from .run_lock import clear_run_dir, run_lock
from .saved_modules import add_tokens, save_tokenizer, template_tokens


@dataclass(frozen=True)
class TrainSummary:
    """What `train_adapter` produced; `output` is None when the run was interrupted or had finished before."""

    output: Path | None
    run_dir: Path
    result: TrainResult
    injection: Injection
    examples: int
    dropped: int
    content_hash: str | None

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"output": str(self.output) if self.output else None, "steps": r.steps, "tokens": r.tokens,
                "train_loss": r.train_loss, "eval_loss": r.eval_loss, "seconds": round(r.seconds, 2),
                "trainable": self.injection.trainable, "total": self.injection.total,
                "modules": len(self.injection.modules), "examples": self.examples, "dropped": self.dropped,
                "content_hash": self.content_hash, "run_dir": str(self.run_dir), "interrupted": r.interrupted,
                "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                "finished_before": r.finished_before}  # fmt: skip


def train_adapter(
    base: str | Path,
    data: str | Path,
    output: str | Path,
    config: TrainConfig,
    *,
    eval_data: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    callbacks: Sequence[Hooks] = (),
    data_options: DataOptions | None = None,
    eval_split: str = "test",
    report_to: Sequence[str] = (),
) -> TrainSummary:
    """Load `base` (transformers), tokenize `data`, inject LoRA, train, save a PEFT adapter at `output`.

    `data_options` say how a dataset that is not a JSONL file is read (`data_sources`); `eval_data`
    is read the same way, from the split `eval_split`. `report_to` names where else the metrics go
    (`reporting`: tensorboard, wandb).
    """
    data_options = data_options or DataOptions()
    config.check()
    output, run_dir = Path(output), run_dir_of(output)
    inputs: list[str | Path] = [data, *([eval_data] if eval_data else [])]
    ensure_distinct(output, [*inputs, *([base] if Path(base).exists() else [])])
    for path in inputs:  # before the seconds spent loading the base
        require_data_file(path)
    check_available(report_to)
    if config.chat_template is not None:
        InputNotFoundError.check(config.chat_template, "chat template ")
    _check_outputs(output, run_dir, force=force, resuming=resume is not None)
    world = distributed.setup(config.device)
    if config.fsdp:  # before the base is loaded
        distributed.check_fsdp(world)
    model, tokenizer = load_base(base, dtype=config.base_dtype, quantize=config.quantize, device=world.device,
                                 command="train", for_fsdp=config.fsdp)  # fmt: skip
    new_tokens = (*(config.add_tokens or ()), *_use_template(tokenizer, config.chat_template))
    resized = add_tokens(model, tokenizer, new_tokens, config.seed) > 0 if new_tokens else False
    train_set = load_dataset(data, tokenizer, config.max_len, packing=config.packing, options=data_options)
    eval_options = replace(data_options, split=eval_split)
    eval_set = load_dataset(eval_data, tokenizer, config.max_len, options=eval_options) if eval_data else None
    injection = inject(model, config)
    with ExitStack() as held:
        if world.is_main:  # OUTPUT.train/ is one run's until it ends: a second run into it stops here
            held.enter_context(run_lock(run_dir))
            if force and resume is None:
                clear_run_dir(run_dir)
        distributed.barrier(world)
        run_config = {"base": str(base), "data": str(data), "eval_data": str(eval_data) if eval_data else None,
                      **config.to_dict()}  # fmt: skip
        reports = reporters(report_to, run_dir, run_config) if world.is_main else []
        try:
            result = train(
                model,
                train_set.examples,
                config,
                eval_data=eval_set.examples if eval_set else None,
                pad_id=tokenizer.pad_token_id or 0,
                callbacks=[MetricsLog(run_dir / "metrics.jsonl"), *reports, *callbacks],
                checkpoint_dir=run_dir / "checkpoints",
                resume=Path(resume) if resume else None,
                world=world,
            )
        finally:
            for report in reports:
                report.close()
        summary = TrainSummary(None, run_dir, result, injection, len(train_set), train_set.dropped, None)
        if result.interrupted or result.finished_before:
            return summary
        adapter = result.adapter if config.fsdp else adapter_from_model(model)  # FSDP: gathered on rank 0 only
        content_hash = None
        if adapter is not None:
            meta = replace(adapter.meta, base_model=str(base), task_type="CAUSAL_LM")
            if (_loaded_differently(config) or resized) and (
                from_files := _file_fingerprint(base, adapter)
            ) is not None:
                meta = replace(meta, base_fingerprint=from_files[0], base_views=from_files[1])
            adapter = replace(adapter, meta=meta)
            adapter = adapter.with_lineage(_lineage(base, config, train_set, eval_set, result, data, data_options))
            content_hash = adapter.content_hash()
        if world.is_main and adapter is not None:
            from ..formats import save_adapter

            save_adapter(adapter, output, force=force or resume is not None)
            if resized or config.chat_template:  # the tokenizer the adapter needs, beside it (as PEFT users save it)
                save_tokenizer(tokenizer, output)
        distributed.barrier(world)
    return TrainSummary(output, run_dir, result, injection, len(train_set), train_set.dropped, content_hash)


def _use_template(tokenizer: Any, path: str | None) -> tuple[str, ...]:
    """Give the tokenizer the chat template in `path`; the `<|tokens|>` it writes that the tokenizer lacks."""
    if path is None:
        return ()
    tokenizer.chat_template = Path(path).read_text()
    return template_tokens(tokenizer.chat_template, tokenizer)


def _loaded_differently(config: TrainConfig) -> bool:
    """Whether the weights in memory may differ from the checkpoint's bytes (another dtype, quantized, a residual)."""
    return config.quantize is not None or config.base_dtype is not None or is_residual_init(config.init)


def _file_fingerprint(base: str | Path, adapter: Adapter) -> tuple[str, dict[str, str]] | None:
    """The base fingerprint and its dtype views from the checkpoint files, as `validate --base` computes them.

    None for a Hub id or a checkpoint lacking an adapted weight.
    """
    if not Path(base).is_dir():
        return None
    with Checkpoint(base) as checkpoint:
        names = [f"{m}.weight" for m in adapter.modules]
        if not all(n in checkpoint for n in names):
            return None
        return checkpoint.fingerprint(names), checkpoint.fingerprint_views(names)


def run_dir_of(output: str | Path) -> Path:
    """Where a run's checkpoints and `metrics.jsonl` go: `OUTPUT.train/` beside the adapter."""
    return Path(f"{output}.train")


def _check_outputs(output: Path, run_dir: Path, *, force: bool, resuming: bool) -> None:
    refuse_existing(output, force=force or resuming)
    if (run_dir / "checkpoints").exists() and not (force or resuming):
        raise UsageError(
            f"{run_dir} holds checkpoints of an earlier run",
            hint=f"continue it with --resume {run_dir / 'checkpoints'}, or pass --force",
        )
    check_writable(output)  # before the base loads: a read-only or blocked path fails in milliseconds
    check_writable(run_dir)


def _lineage(
    base: str | Path,
    config: TrainConfig,
    train_set: Dataset,
    eval_set: Dataset | None,
    result: TrainResult,
    data: str | Path,
    options: DataOptions,
) -> dict[str, Any]:
    params = {"base": str(base), **config.to_dict()}
    if options != DataOptions() or not Path(data).is_file():  # a dataset, not a JSONL file: how it was read
        params["data"] = {"source": str(data), "split": options.split, "config": options.config,
                          "streaming": options.streaming, "columns": dict(options.columns)}  # fmt: skip
    metrics = {
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "data_sha256": train_set.sha256,
        "eval_data_sha256": eval_set.sha256 if eval_set else None,
        "examples": len(train_set),
        "seconds": round(result.seconds, 3),
    }
    return new_entry("train", params, parents=[], metrics=metrics)
