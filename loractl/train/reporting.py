"""`--report-to tensorboard|wandb`: the scalars of `metrics.jsonl` and the run's config, through each library.

TensorBoard gets a `SummaryWriter` logging into `OUTPUT.train/tensorboard/` (`tensorboard --logdir`
shows it). W&B gets `wandb.init` with the run config, its files under `OUTPUT.train/wandb/`; without
an API key (no `WANDB_API_KEY`, no `wandb login` in ~/.netrc) and no `WANDB_MODE`, the run is
offline, to be pushed later with `wandb sync`. Scalars are named as transformers' Trainer names them:
`train/loss`, `train/lr`, … per step and `eval/loss` per eval, at the step. `metrics.jsonl` is
written either way.
"""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .callbacks import Callback

CHOICES = ("tensorboard", "wandb", "none")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """`tensorboard,wandb` → ("tensorboard", "wandb"); `none` or nothing → ()."""
    names = tuple(v.strip() for v in (value or "none").split(",") if v.strip())
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise UsageError(f"--report-to {', '.join(unknown)} is not one of {', '.join(CHOICES)}",
                         hint="e.g. --report-to tensorboard or --report-to tensorboard,wandb")  # fmt: skip
    return tuple(n for n in names if n != "none")


def check_available(names: Sequence[str]) -> None:
    """Raise `UsageError` before the run when a named library is not installed."""
    missing = [_PACKAGES[n] for n in names if find_spec(_PACKAGES[n]) is None]
    if missing:
        raise UsageError(f"--report-to {', '.join(missing)} needs {', '.join(missing)}, which is not installed",
                         hint="pip install 'loractl[logging]'")  # fmt: skip


def reporters(names: Sequence[str], run_dir: Path, run_config: dict[str, Any]) -> list[Reporter]:
    """One reporter per name, started (on rank 0 only: the caller decides)."""
    check_available(names)
    makers = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    return [makers[n](run_dir, run_config) for n in names]


class Reporter(Callback):
    """A `Callback` that sends scalars somewhere and must be closed at the end of the run."""

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        step = int(metrics["step"])
        self.scalars({f"train/{k}": v for k, v in metrics.items() if k != "step" and _number(v)}, step)
        return None

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self.scalars({"eval/loss": metrics["eval_loss"]}, int(metrics["step"]))

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardReporter(Reporter):
    """torch's `SummaryWriter` into `run_dir/tensorboard`; the config as a JSON text entry."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = "```json\n" + json.dumps(run_config, indent=2, sort_keys=True, default=str) + "\n```"
        self.writer.add_text("config", text, global_step=0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """`wandb.init` with the run config; offline unless a key or `WANDB_MODE` says otherwise."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any]) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loractl"), name=run_dir.name.removesuffix(".train"),
                              dir=str(run_dir), config=run_config, mode=mode)  # type: ignore[arg-type]  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def has_wandb_key() -> bool:
    """Whether W&B has credentials: `WANDB_API_KEY`, or an api.wandb.ai entry in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
