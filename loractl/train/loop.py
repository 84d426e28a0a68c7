"""The training loop: one function to read top to bottom; logging and progress are callbacks.

Loss is the mean cross-entropy over every label token of a global batch (all micro-batches of
all ranks), so batch 8 × 1 process, batch 4 × 2 accumulation steps and batch 4 × 2 processes
take the same step up to float rounding. Rank 0 alone calls the callbacks and writes files.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
from torch import nn

from ..adapter import Adapter
from ..errors import UsageError
from . import checkpoints, distributed
from .config import TrainConfig
from .data import IGNORE, Example, collate
from .distributed import World
from .export import adapter_from_model, unwrap
from .loss import CausalLMLoss


class Hooks(Protocol):
    """What the loop calls on rank 0: at the start, after each logged step, eval and checkpoint."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, metrics: dict[str, Any]) -> bool | None: ...
    def on_eval(self, metrics: dict[str, Any]) -> None: ...
    def on_save(self, path: Path, step: int) -> None: ...


class Callback:
    """`Hooks` that do nothing: subclass and override what you need. `on_step` returning True stops the run."""

    def on_start(self, info: dict[str, Any]) -> None:
        return None

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        return None

    def on_eval(self, metrics: dict[str, Any]) -> None:
        return None

    def on_save(self, path: Path, step: int) -> None:
        return None


class MetricsLog(Callback):
    """Appends one JSON object per logged step and per eval to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        self._write(metrics)
        return None

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self._write(metrics)

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(doc, sort_keys=True) + "\n")


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

    `model(input_ids=..., attention_mask=...)` must return logits (batch, seq, vocab) or an object
    with `.logits`. Checkpoints go to `checkpoint_dir/step-N` every `save_every` steps and on Ctrl-C.
    """
    config = config or TrainConfig()
    config.check()
    world = world or distributed.setup()
    params = [p for p in model.parameters() if p.requires_grad]
    _check_inputs(params, data, config, checkpoint_dir, resume)
    if config.fsdp:
        distributed.check_fsdp(world, save_every=config.save_every, resume=resume)
        checkpoint_dir = None  # not even on Ctrl-C: checkpoints hold unsharded parameters
    trainable = sum(p.numel() for p in params)
    everything = sum(p.numel() for p in model.parameters())
    _prepare(model, config)
    forward = _Forward(model, config, world)  # FSDP shards the parameters: build the optimizer after it
    params = [p for p in forward.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=_fused(world))
    scaler = torch.amp.GradScaler(_device_type(world), enabled=config.precision == "fp16")
    torch.manual_seed(config.seed + world.rank)  # dropout draws; a resume restores the exact state
    position = checkpoints.Position()
    if resume is not None:
        position = checkpoints.load(resume, model, optimizer, scaler, config, world)
    order = BatchOrder(len(data), config, world)
    total = config.total_steps(len(data), world.size)
    hooks = callbacks if world.is_main else ()
    for hook in hooks:
        hook.on_start({"trainable": trainable, "total": everything, "ratio": trainable / everything, "steps": total,
                       "start_step": position.step, "examples": len(data), "world_size": world.size})  # fmt: skip
    loss: float | None = None
    eval_loss: float | None = None
    saved: Path | None = None
    start = time.perf_counter()
    with _sigint_flag() as interrupt:
        while position.step < total:
            tick, rng = time.perf_counter(), checkpoints.rng_state(world)
            batches = [collate([data[i] for i in rows], pad_id) for rows in order.micro_batches(position.step)]
            targets, tokens, stop = distributed.sum_across(
                [sum(_targets(b) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches),
                 float(interrupt.is_set())], world)  # fmt: skip
            if stop:  # every rank sees the same sum, so all stop at the same step
                saved = _save(checkpoint_dir, model, optimizer, scaler, position, config, rng, world, hooks)
                return TrainResult(position.step, position.tokens, loss, eval_loss, _since(start), True, saved)
            lr = lr_at(position.step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = _optimizer_step(forward, optimizer, scaler, params, batches, targets, config, world)
            position.step += 1
            position.tokens += int(tokens)
            seconds = time.perf_counter() - tick
            metrics = {"step": position.step, "total_steps": total, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": position.tokens, "tokens_per_s": tokens / seconds, "elapsed_s": _since(start)}  # fmt: skip
            if position.step % config.log_every == 0 or position.step == total:
                for hook in hooks:
                    if hook.on_step(metrics):
                        interrupt.set()
            if eval_data and config.eval_every and position.step % config.eval_every == 0:
                eval_loss = _eval(forward, eval_data, config, world, pad_id, position.step, hooks)
            if checkpoint_dir and config.save_every and position.step % config.save_every == 0:
                saved = _save(
                    checkpoint_dir,
                    model,
                    optimizer,
                    scaler,
                    position,
                    config,
                    checkpoints.rng_state(world),
                    world,
                    hooks,
                )
    if eval_data and not (config.eval_every and position.step % config.eval_every == 0):
        eval_loss = _eval(forward, eval_data, config, world, pad_id, position.step, hooks)
    adapter = None
    if config.fsdp:
        with distributed.full_params(forward.net, world):
            adapter = adapter_from_model(model) if world.is_main else None
    return TrainResult(position.step, position.tokens, loss, eval_loss, _since(start), False, saved, adapter)


def evaluate(model: nn.Module, data: Sequence[Example], config: TrainConfig | None = None, *,
             pad_id: int = 0, world: World | None = None) -> float:  # fmt: skip
    """Mean cross-entropy per label token over `data`, without dropout or gradients."""
    config = config or TrainConfig()
    world = world or distributed.setup()
    return _mean_loss(_Forward(unwrap(model), config, world, ddp=False), data, config, world, pad_id)


def _mean_loss(forward: _Forward, data: Sequence[Example], config: TrainConfig, world: World, pad_id: int) -> float:
    """`evaluate` through `forward`; every rank runs as many batches (FSDP gathers in lockstep)."""
    was_training = unwrap(forward.net).training
    forward.net.eval()
    mine = list(data)[world.rank :: world.size]
    rounds = -(-len(data) // world.size // config.batch_size) if data else 0  # rank 0 has the most examples
    loss_sum = count = 0.0
    with torch.no_grad():
        for i in range(0, rounds * config.batch_size, config.batch_size):
            rows = mine[i : i + config.batch_size]
            batch = collate(rows or list(data[:1]), pad_id)  # a rank out of examples runs one, uncounted
            loss = float(forward.loss_sum(batch))
            loss_sum, count = (loss_sum + loss, count + _targets(batch)) if rows else (loss_sum, count)
    forward.net.train(was_training)
    loss_sum, count = distributed.sum_across([loss_sum, count], world)
    return loss_sum / count if count else math.nan


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    return config.lr


class BatchOrder:
    """Which examples each step uses: a seeded shuffle per epoch, cut into global batches.

    A step's global batch is dealt round-robin to ranks, then cut into micro-batches; it depends
    only on (seed, step, global batch size), which is what makes resume and DDP exact.
    """

    def __init__(self, num_examples: int, config: TrainConfig, world: World) -> None:
        self.n, self.seed, self.world = num_examples, config.seed, world
        self.batch, self.accum = config.batch_size, config.grad_accum
        self._perms: dict[int, list[int]] = {}

    def micro_batches(self, step: int) -> list[list[int]]:
        size = self.batch * self.accum * self.world.size
        indices = [self._index(p) for p in range(step * size, (step + 1) * size)]
        mine = indices[self.world.rank :: self.world.size]
        return [mine[k * self.batch : (k + 1) * self.batch] for k in range(self.accum)]

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            }
        return self._perms[epoch][position % self.n]


class _Forward:
    """The loss module (DDP-wrapped across ranks) called under the configured autocast."""

    def __init__(self, model: nn.Module, config: TrainConfig, world: World, *, ddp: bool = True) -> None:
        loss = CausalLMLoss(model)
        self.net = distributed.wrap(loss, world, fsdp=config.fsdp) if ddp else loss
        self.device = torch.device(world.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.autocast: AbstractContextManager[Any] = (
            torch.autocast(_device_type(world), dtype=dtype) if dtype is not None else nullcontext()
        )

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        with self.autocast:  # no mask when nothing is padded: attention takes its causal fast path
            loss: torch.Tensor = self.net(input_ids=batch["input_ids"].to(self.device),
                                          labels=batch["labels"].to(self.device),
                                          attention_mask=None if bool(mask.all()) else mask.to(self.device))  # fmt: skip
        return loss


def _optimizer_step(forward: _Forward, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    params: list[nn.Parameter], batches: list[dict[str, torch.Tensor]], targets: float,
                    config: TrainConfig, world: World) -> tuple[float, float | None]:  # fmt: skip
    """Accumulate gradients of the global-batch mean loss, clip, step; (mean loss, grad norm)."""
    weight = world.size / max(targets, 1.0)  # DDP averages over ranks; this turns it into a global mean
    loss_sum = 0.0
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1 or world.size == 1
        with nullcontext() if sync else forward.net.no_sync():  # type: ignore[operator]
            loss = forward.loss_sum(batch)
            scaler.scale(loss * weight).backward()  # type: ignore[no-untyped-call]
        loss_sum += float(loss.detach())
    grad_norm = None
    if config.max_grad_norm:
        scaler.unscale_(optimizer)
        if config.fsdp:  # FSDP's own clip: the norm over every rank's shards
            norm = forward.net.clip_grad_norm_(config.max_grad_norm)  # type: ignore[operator]
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        grad_norm = float(norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    (total,) = distributed.sum_across([loss_sum], world)
    return total / max(targets, 1.0), grad_norm


def _eval(forward: _Forward, data: Sequence[Example], config: TrainConfig, world: World, pad_id: int, step: int,
          hooks: Sequence[Hooks]) -> float:  # fmt: skip
    if not config.fsdp:  # DDP: evaluate the plain model, no gradient hooks or buffer broadcasts
        forward = _Forward(unwrap(forward.net), config, world, ddp=False)
    loss = _mean_loss(forward, data, config, world, pad_id)
    for hook in hooks:
        hook.on_eval({"step": step, "eval_loss": loss})
    return loss


def _save(directory: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          position: checkpoints.Position, config: TrainConfig, rng: dict[str, torch.Tensor], world: World,
          hooks: Sequence[Hooks]) -> Path | None:  # fmt: skip
    if directory is None:
        return None
    path = checkpoints.save(directory, model, optimizer, scaler, position, config, rng, world)
    for hook in hooks:
        hook.on_save(path, position.step)  # type: ignore[arg-type]
    return path


def _check_inputs(params: list[nn.Parameter], data: Sequence[Example], config: TrainConfig,
                  checkpoint_dir: Path | None, resume: Path | None) -> None:  # fmt: skip
    if not params:
        raise UsageError("the model has no trainable parameters", hint="call loractl.train.inject(model, config) first")
    if not data:
        raise UsageError("no training examples", hint="give at least one example")
    if config.save_every and checkpoint_dir is None:
        raise UsageError("save_every needs a checkpoint directory")


def _prepare(model: nn.Module, config: TrainConfig) -> None:
    model.train()
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


def _targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _fused(world: World) -> bool | None:
    """Fused AdamW where torch has it for the device (CUDA, and CPU since torch 2.4)."""
    return True if world.device.startswith(("cuda", "cpu")) else None


def _device_type(world: World) -> str:
    return torch.device(world.device).type


def _since(start: float) -> float:
    return time.perf_counter() - start


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
