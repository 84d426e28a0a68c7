"""The same steps on PEFT's side: a PEFT model started from loractl's A (B = 0) and trained by a plain loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loractl.train import Callback, TrainConfig, inject, train
from loractl.train.base import load_base
from loractl.train.data import Example, collate, load_dataset

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        self.losses.append(metrics["loss"])
        return None


def examples(tokenizer: Any) -> list[Example]:
    return list(load_dataset(FIXTURES / "data" / "train.jsonl", tokenizer, 32).examples[:6])


def peft_losses(
    model: nn.Module,
    ours: nn.Module,
    rows: list[Example],
    config: TrainConfig,
    optimizer_of: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    **lora: Any,
) -> list[float]:
    """PEFT's LoRA on `model`, started from our A (B = 0), trained by the plain loop a PEFT user writes.

    `optimizer_of(peft_model)` builds the optimizer (default: AdamW over the trainable parameters).
    """
    import peft

    options = dict(r=config.rank, lora_alpha=config.alpha, target_modules=TARGETS, lora_dropout=0.0,
                   use_dora=config.dora)  # fmt: skip
    twin = peft.get_peft_model(model, peft.LoraConfig(**{**options, **lora}))
    with torch.no_grad():
        for name, module in ours.named_modules():
            theirs = twin.base_model.model.get_submodule(name) if hasattr(module, "lora_A") else None
            if theirs is not None and "default" in getattr(theirs, "lora_embedding_A", {}):
                theirs.lora_embedding_A["default"].copy_(module.lora_A)
                theirs.lora_embedding_B["default"].copy_(module.lora_B)
            elif theirs is not None:
                theirs.lora_A["default"].weight.copy_(module.lora_A)
    params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = optimizer_of(twin) if optimizer_of else torch.optim.AdamW(params, lr=config.lr)
    batch = collate(rows, 0)
    losses = []
    twin.train()
    for _ in range(config.steps or 0):
        loss = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def ours_vs_peft(
    config: TrainConfig,
    base: Path = TINY,
    lora: dict[str, Any] | None = None,
    optimizer_of: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    **load: Any,
) -> tuple[list[float], list[float]]:
    """The losses of `config`'s steps on `base` loaded with `load`, by loractl and by PEFT (`lora`: its options)."""
    model, tokenizer = load_base(base, **load)
    rows = examples(tokenizer)
    inject(model, config)
    record = Losses()
    twin_base, _ = load_base(base, **load)  # the same base, quantized the same way (deterministic)
    theirs = peft_losses(twin_base, model, rows, config, optimizer_of, **(lora or {}))
    train(model, rows, config, callbacks=[record])
    return record.losses, theirs


def config(**kw: Any) -> TrainConfig:
    base = dict(targets=tuple(TARGETS), rank=4, alpha=8, lr=2e-2, steps=4, batch_size=6, schedule="constant",
                max_grad_norm=None)  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]
