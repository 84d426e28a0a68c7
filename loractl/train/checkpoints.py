"""Resumable checkpoints: the LoRA factors, optimizer, RNG states and data position of a step.

Layout: `DIR/step-000010/` holding `adapter/` (PEFT, usable as is) and `state.pt` (loaded with
`weights_only=True`). The learning rate is a pure function of the step and the data order a
pure function of (seed, step), so the step number restores both exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, InputNotFoundError, UsageError
from ..io.atomic import atomic_output
from .config import TrainConfig
from .distributed import World, gather
from .export import extract_adapter, unwrap
from .state import Position, TrainState

STATE_NAME = "state.pt"
# Settings that may change between a run and its resumption without changing the math so far.
_RESUMABLE_CHANGES = {"steps", "epochs", "save_every", "eval_every", "log_every", "device", "compile"}


def save(directory: Path, state: TrainState, config: TrainConfig, rng: dict[str, torch.Tensor]) -> Path | None:
    """Write `directory/step-N` (rank 0; every rank must call it, for the RNG gather); its path on rank 0."""
    world, position, model = state.world, state.position, state.model
    rngs = gather(rng, world)
    if not world.is_main:
        return None
    doc = {
        "step": position.step,
        "tokens": position.tokens,
        "global_batch": config.batch_size * config.grad_accum * world.size,
        "config": config.to_dict(),
        "lora": {k: v.detach().cpu() for k, v in unwrap(model).named_parameters() if v.requires_grad},
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rngs,
    }
    from ..formats import save_adapter

    final = directory / f"step-{position.step:06d}"
    with atomic_output(final, force=True) as tmp:
        tmp.mkdir(parents=True)
        torch.save(doc, tmp / STATE_NAME)
        save_adapter(extract_adapter(model), tmp / "adapter")
    return final


def rng_state(world: World) -> dict[str, torch.Tensor]:
    """This rank's RNG states (dropout draws from them), taken at the start of a step."""
    state = {"cpu": torch.get_rng_state()}
    if world.device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(world.device))
    return state


def latest(path: Path) -> Path:
    """`path` itself if it is a step checkpoint, else its newest `step-*` child."""
    if (path / STATE_NAME).is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / STATE_NAME).is_file()) if path.is_dir() else []
    if not steps:
        raise InputNotFoundError(f"no checkpoint in {path}", hint="point --resume at a step-N directory or its parent")
    return steps[-1]


def load(path: Path, state: TrainState, config: TrainConfig) -> Position:
    """Restore a checkpoint into the state's LoRA parameters, optimizer, scaler and this rank's RNG; the position."""
    world = state.world
    path = latest(path)
    try:
        doc: dict[str, Any] = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable state is the same user-facing problem
        raise FormatError(f"cannot read checkpoint state ({str(e).splitlines()[0][:120]})", path=path) from None
    _check_compatible(doc, config, world, path)
    params = {k: v for k, v in unwrap(state.model).named_parameters() if v.requires_grad}
    if set(params) != set(doc["lora"]):
        raise UsageError(
            "the checkpoint's LoRA layers differ from the model's",
            path=path,
            hint="resume with the same base, --targets and --rank",
        )
    with torch.no_grad():
        for name, value in doc["lora"].items():
            params[name].copy_(value)
    state.optimizer.load_state_dict(doc["optimizer"])
    state.scaler.load_state_dict(doc["scaler"])
    rng = doc["rng"][world.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], torch.device(world.device))
    return Position(int(doc["step"]), int(doc["tokens"]))


def _check_compatible(state: dict[str, Any], config: TrainConfig, world: World, path: Path) -> None:
    saved, now = {**TrainConfig().to_dict(), **state["config"]}, config.to_dict()  # settings newer than the file
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved[k] != now[k])
    if changed:
        detail = ", ".join(f"{k} {saved[k]!r} → {now[k]!r}" for k in changed)
        raise UsageError(
            f"the run's settings differ from the checkpoint's: {detail}",
            path=path,
            hint="resume with the settings the checkpoint was made with",
        )
    global_batch = config.batch_size * config.grad_accum * world.size
    if state["global_batch"] != global_batch or len(state["rng"]) != world.size:
        raise UsageError(
            f"the checkpoint was made with {len(state['rng'])} process(es) and global batch "
            f"{state['global_batch']}, this run has {world.size} and {global_batch}",
            path=path,
            hint="resume with the same number of processes and batch settings",
        )
