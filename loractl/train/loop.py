"""The training loop: setup, then one step after another; logging and progress are callbacks.

`train` reads top to bottom: check the inputs, build the `TrainState` (wrapping, optimizer,
scaler, seeds, a resumed position), then `_Run` steps until the total, evaluating and
checkpointing on schedule. Rank 0 alone calls the callbacks and writes files.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..errors import OutputWriteError, UsageError
from . import checkpoints, distributed
from .base_matmul import frozen_weight
from .callbacks import Hooks
from .config import TrainConfig
from .data import Example, collate
from .distributed import World
from .export import unwrap
from .inject import parameter_counts
from .lora_plus import param_groups
from .loss import CausalLMLoss
from .schedule import BatchOrder, length_groups, lr_at
from .state import TrainState
from .step import count_targets, mean_loss, optimizer_step


@dataclass(frozen=True)
class TrainResult:
    """How a run ended. `interrupted`: stopped early (Ctrl-C or a callback); resume from `checkpoint`."""

    steps: int
    tokens: int
    train_loss: float | None
    eval_loss: float | None
    seconds: float
    interrupted: bool = False
    checkpoint: Path | None = None
    adapter: Adapter | None = None  # FSDP runs: the trained adapter, gathered on rank 0 (the model stays sharded)
    finished_before: bool = False  # resumed from a checkpoint at the last step: nothing ran, write nothing


def train(
    model: nn.Module,
    data: Sequence[Example],
    config: TrainConfig | None = None,
    *,
    eval_data: Sequence[Example] | None = None,
    pad_id: int = 0,
    callbacks: Sequence[Hooks] = (),
    checkpoint_dir: Path | None = None,
    resume: Path | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters in place on `data` (see `inject`).

    `model(input_ids=...)` (plus `position_ids=` for packed rows) must return logits (batch, seq, vocab)
    or an object with `.logits`, attending causally: rows are right-padded and no mask is passed. Checkpoints go to `checkpoint_dir/step-NNNNNN` every `save_every` steps and on Ctrl-C.
    A `resume` from a checkpoint already at the last step runs nothing (`finished_before`); one past it raises.
    """
    config = config or TrainConfig()
    config.check()
    world = world or distributed.setup(config.device)
    _check_inputs(model, data, config, checkpoint_dir)
    if config.fsdp:
        distributed.check_fsdp(world)
    info = _sizes(model, len(data))
    state = _setup(model, config, world, resume)
    if resume is not None and state.position.step >= (total := config.total_steps(len(data), world.size)):
        return _finished(state.position.step, total, state.position.tokens, checkpoints.latest(resume))
    hooks = callbacks if world.is_main else ()
    run = _Run(state, config, data, eval_data, pad_id, hooks, checkpoint_dir)
    return run.until_done(info)


def evaluate(
    model: nn.Module,
    data: Sequence[Example],
    config: TrainConfig | None = None,
    *,
    pad_id: int = 0,
    world: World | None = None,
) -> float:
    """Mean cross-entropy per label token over `data`, without dropout or gradients."""
    config = config or TrainConfig()
    world = world or distributed.setup(config.device)
    return mean_loss(CausalLMLoss(unwrap(model)), data, config, world, pad_id)


def _setup(model: nn.Module, config: TrainConfig, world: World, resume: Path | None) -> TrainState:
    """Everything before the first step: train mode, wrapping, optimizer, scaler, seeds, a resumed position."""
    _prepare(model, config)
    net = distributed.wrap(CausalLMLoss(model), world, fsdp=config.fsdp)  # FSDP shards: the optimizer comes after
    groups = param_groups(net, config)  # one group, or LoRA+'s
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=_fused(world))
    scaler = torch.amp.GradScaler(torch.device(world.device).type, enabled=config.precision == "fp16")
    torch.manual_seed(config.seed + world.rank)  # dropout draws; a resume restores the exact state
    state = TrainState(model, net, params, optimizer, scaler, world)
    if resume is not None:
        state.position = checkpoints.load(resume, state, config)
    return state


@dataclass
class Throughput:
    """Tokens per second over this run's steps after its first, whose warm-up (allocation, compilation)
    would skew a mean; the first step's own rate until a second one is done. Eval and checkpoints
    are not counted. One step alone is no measure: its rate swung 60-fold between steps in piped logs.
    """

    tokens: int = 0
    seconds: float = 0.0
    first: float | None = None

    def add(self, tokens: int, seconds: float) -> float:
        """Count one step; the rate to report after it."""
        if self.first is None:
            self.first = tokens / seconds
            return self.first
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        return self.tokens / self.seconds


@dataclass
class _Run:
    """The step loop of one run, and what it has produced so far (last losses, last checkpoint)."""

    state: TrainState
    config: TrainConfig
    data: Sequence[Example]
    eval_data: Sequence[Example] | None
    pad_id: int
    hooks: Sequence[Hooks]
    checkpoint_dir: Path | None
    loss: float | None = None
    eval_loss: float | None = None
    saved: Path | None = None
    rate: Throughput = field(default_factory=Throughput)

    def until_done(self, info: dict[str, Any]) -> TrainResult:
        world, position = self.state.world, self.state.position
        total = self.config.total_steps(len(self.data), world.size)
        order = BatchOrder(len(self.data), self.config, world)
        for hook in self.hooks:
            hook.on_start({**info, "steps": total, "start_step": position.step, "world_size": world.size})
        self.start = time.perf_counter()
        with _sigint_flag() as interrupt:
            while position.step < total:
                if not self.step(order, total, interrupt):
                    return self.result(interrupted=True)
        if self.eval_data and not self._due(self.config.eval_every):
            self.evaluate()
        return self.result(interrupted=False, adapter=self._gathered_adapter())

    def step(self, order: BatchOrder, total: int, interrupt: threading.Event) -> bool:
        """One optimizer step, then its log, eval and checkpoint; False (after a checkpoint) to stop first."""
        state, config, position = self.state, self.config, self.state.position
        tick, rng = time.perf_counter(), checkpoints.rng_state(state.world)
        micro = order.micro_batches(position.step)
        if not config.fsdp:  # FSDP ranks must run as many forwards as each other; padding stays there
            micro = [
                group for rows in micro for group in length_groups(rows, [len(self.data[i].input_ids) for i in rows])
            ]
        batches = [collate([self.data[i] for i in rows], self.pad_id) for rows in micro]
        counts = [
            sum(count_targets(b) for b in batches),
            sum(int(b["attention_mask"].sum()) for b in batches),
            float(interrupt.is_set()),
        ]
        targets, tokens, stop = distributed.sum_across(counts, state.world)
        if stop:  # every rank sees the same sum, so all stop at the same step
            self.save(rng)
            return False
        lr = lr_at(position.step, total, config)
        for group in state.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+ (`lora_plus`); 1 in older checkpoints
        self.loss, grad_norm = optimizer_step(state, batches, targets, config)
        seconds = time.perf_counter() - tick
        tokens_per_s = self.rate.add(int(tokens), seconds)
        position.step += 1
        position.tokens += int(tokens)
        metrics = {
            "step": position.step,
            "total_steps": total,
            "loss": self.loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": position.tokens,
            "tokens_per_s": tokens_per_s,
            "step_s": seconds,  # this step's own time (tokens_per_s is the run's mean, `Throughput`)
            "elapsed_s": time.perf_counter() - self.start,
        }
        if self._due(config.log_every) or position.step == total:
            stops = [hook.on_step(metrics) for hook in self.hooks]
            if any(stops):
                interrupt.set()
        if self.eval_data and self._due(config.eval_every):
            self.evaluate()
        if self.checkpoint_dir and self._due(config.save_every):
            self.save(checkpoints.rng_state(state.world))
        return True

    def evaluate(self) -> None:
        assert self.eval_data is not None
        # DDP: evaluate the plain model, without gradient hooks or buffer broadcasts; FSDP: the sharded one.
        net = self.state.net if self.config.fsdp else CausalLMLoss(self.state.model)
        self.eval_loss = mean_loss(net, self.eval_data, self.config, self.state.world, self.pad_id)
        for hook in self.hooks:
            hook.on_eval({"step": self.state.position.step, "eval_loss": self.eval_loss})

    def save(self, rng: dict[str, torch.Tensor]) -> None:
        if self.checkpoint_dir is None:
            return
        try:
            self.saved = checkpoints.save(self.checkpoint_dir, self.state, self.config, rng)
        except OutputWriteError as e:  # a full disk: the checkpoints saved before are intact
            if self.saved is not None:
                e.hint = f"free disk space, then continue the run with --resume {self.saved}"
            raise
        for hook in self.hooks:
            hook.on_save(self.saved, self.state.position.step)  # type: ignore[arg-type]

    def result(self, *, interrupted: bool, adapter: Adapter | None = None) -> TrainResult:
        position, seconds = self.state.position, time.perf_counter() - self.start
        return TrainResult(
            position.step, position.tokens, self.loss, self.eval_loss, seconds, interrupted, self.saved, adapter
        )

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.position.step % every == 0

    def _gathered_adapter(self) -> Adapter | None:
        """FSDP: the adapter, gathered on rank 0 (None elsewhere); DDP and one process read the model later."""
        return distributed.gather_adapter(self.state.net, self.state.world) if self.config.fsdp else None


def _finished(step: int, total: int, tokens: int, checkpoint: Path) -> TrainResult:
    """A resumed run whose checkpoint is at its last step: nothing to do (past it: a `UsageError`)."""
    if step > total:
        raise UsageError(
            f"the checkpoint is at step {step}, past the {total} steps of this run",
            path=checkpoint,
            hint=f"resume with --steps {step} or more, or start a new run with --force",
        )
    return TrainResult(step, tokens, None, None, 0.0, checkpoint=checkpoint, finished_before=True)


def _check_inputs(model: nn.Module, data: Sequence[Example], config: TrainConfig, checkpoint_dir: Path | None) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("the model has no trainable parameters", hint="call loractl.train.inject(model, config) first")
    if not data:
        raise UsageError("no training examples", hint="give at least one example")
    if config.save_every and checkpoint_dir is None:
        raise UsageError("save_every needs a checkpoint directory")


def _sizes(model: nn.Module, examples: int) -> dict[str, Any]:
    """Parameter counts for `on_start`, taken before any wrapper reshapes the parameters."""
    trainable, everything = parameter_counts(model)
    return {"trainable": trainable, "total": everything, "ratio": trainable / everything, "examples": examples}


def _prepare(model: nn.Module, config: TrainConfig) -> None:
    model.train()
    if config.compile:
        _compile(model)
    if not config.grad_checkpointing:
        return
    new, old = (
        getattr(model, "activation_checkpointing_enable", None),
        getattr(model, "gradient_checkpointing_enable", None),
    )
    if callable(new):  # transformers >= 5
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(old):
        old(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise UsageError("this model has no gradient checkpointing switch", hint="train without --grad-checkpointing")


def _compile(model: nn.Module) -> None:
    """`torch.compile` each decoder layer in place (one graph reused by every layer of the same shape)."""
    layers = distributed.decoder_layers(model)
    if not layers:
        raise UsageError(
            "--compile: this model names no decoder layers (transformers' _no_split_modules)",
            hint="train without --compile",
        )
    for layer in layers:
        for module in layer.modules():  # each frozen matmul's dtype measured now: a trace cannot time it
            if isinstance(base := getattr(module, "base_layer", None), nn.Module):
                frozen_weight(base, torch.float32)
        layer.compile()


def _fused(world: World) -> bool | None:
    """Fused AdamW where torch has it for the device (CUDA, and CPU since torch 2.4)."""
    return True if world.device.startswith(("cuda", "cpu")) else None


@contextmanager
def _sigint_flag() -> Iterator[threading.Event]:
    """An event set by the first Ctrl-C (the loop then checkpoints and stops); the second one aborts."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
