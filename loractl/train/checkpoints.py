"""Resumable checkpoints: the LoRA factors, optimizer, RNG states and data position of a step.

Layout: `DIR/step-000010/` holding `adapter/` (PEFT, usable as is) and `state.pt` (loaded with
`weights_only=True`). The learning rate is a pure function of the step and the data order a
pure function of (seed, step), so the step number restores both exactly. Under FSDP the LoRA
factors and optimizer state stay sharded: each rank writes its shard into `sharded/` with
torch.distributed.checkpoint, and `state.pt` holds the rest. The frozen base is never saved.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, InputNotFoundError, UsageError
from ..formats._state_dict import save_pickle
from ..io.atomic import atomic_output
from .config import TrainConfig
from .distributed import World, barrier, broadcast, gather, gather_adapter
from .export import adapter_from_model, unwrap
from .state import Position, TrainState

STATE_NAME = "state.pt"
SHARDED_NAME = "sharded"
# Settings that may change between a run and its resumption without changing the math so far.
_FSDP_PREFIX = re.compile(r"_fsdp_wrapped_module\.")
_RESUMABLE_CHANGES = {"steps", "epochs", "save_every", "eval_every", "log_every", "device", "compile"}


def save(directory: Path, state: TrainState, config: TrainConfig, rng: dict[str, torch.Tensor]) -> Path | None:
    """Write `directory/step-NNNNNN` (rank 0; every rank must call it, for the RNG gather); its path on rank 0."""
    world, position, model = state.world, state.position, state.model
    doc = {
        "step": position.step,
        "tokens": position.tokens,
        "global_batch": config.batch_size * config.grad_accum * world.size,
        "config": config.to_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": gather(rng, world),
    }
    final = directory / f"step-{position.step:06d}"
    if config.fsdp:
        return _save_sharded(final, state, doc)
    if not world.is_main:
        return None
    doc["lora"] = {k: v.detach().cpu() for k, v in unwrap(model).named_parameters() if v.requires_grad}
    doc["optimizer"] = state.optimizer.state_dict()
    from ..formats import save_adapter

    with atomic_output(final, force=True, completes=False) as tmp:
        tmp.mkdir(parents=True)
        save_pickle(tmp / STATE_NAME, doc)  # a full disk is an OSError naming the file, not torch's RuntimeError
        save_adapter(adapter_from_model(model), tmp / "adapter")
    return final


def _save_sharded(final: Path, state: TrainState, doc: dict[str, Any]) -> Path | None:
    """FSDP: every rank writes its shard (DCP) into rank 0's temporary directory; rank 0 renames it."""
    from torch.distributed.checkpoint.state_dict_saver import save as save_shards

    from ..formats import save_adapter

    world = state.world
    with atomic_output(final, force=True, completes=False) if world.is_main else nullcontext(None) as mine:
        tmp = Path(str(broadcast(str(mine), world)))
        if world.is_main:
            tmp.mkdir(parents=True)
        barrier(world)
        save_shards(_sharded_state(state), checkpoint_id=tmp / SHARDED_NAME)
        adapter = gather_adapter(state.net, world)  # one unit at a time, never the whole base
        if world.is_main and adapter is not None:
            save_pickle(tmp / STATE_NAME, doc)
            save_adapter(adapter, tmp / "adapter")
        barrier(world)  # every shard is written before rank 0 renames
    return final if world.is_main else None


def _sharded_state(state: TrainState) -> dict[str, Any]:
    """The LoRA parameters and optimizer state as sharded state dicts (this rank's shards, no gather)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(state.net, state.optimizer)
    trainable = {_FSDP_PREFIX.sub("", n) for n, p in state.net.named_parameters() if p.requires_grad}
    return {"lora": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state}


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
        raise InputNotFoundError(
            f"no checkpoint in {path}", hint="point --resume at a step-000020 directory or its parent"
        )
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
    if config.fsdp:
        _load_sharded(path, state)
    else:
        _load_replicated(path, state, doc)
    state.scaler.load_state_dict(doc["scaler"])
    rng = doc["rng"][world.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], torch.device(world.device))
    return Position(int(doc["step"]), int(doc["tokens"]))


def _load_sharded(path: Path, state: TrainState) -> None:
    """FSDP: each rank reads its shard of the LoRA parameters and optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as load_shards

    if not (path / SHARDED_NAME).is_dir():
        raise UsageError("this checkpoint was not made with --fsdp", path=path, hint="resume it without --fsdp")
    sharded = _sharded_state(state)
    load_shards(sharded, checkpoint_id=path / SHARDED_NAME)
    options = StateDictOptions(strict=False)  # the base is not in the checkpoint
    set_state_dict(
        state.net,
        state.optimizer,
        model_state_dict=sharded["lora"],
        optim_state_dict=sharded["optimizer"],
        options=options,
    )


def _load_replicated(path: Path, state: TrainState, doc: dict[str, Any]) -> None:
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
