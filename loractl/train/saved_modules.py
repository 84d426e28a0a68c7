"""Modules trained in full beside the LoRA layers (PEFT's `modules_to_save`), and new tokens.

As PEFT's `ModulesToSaveWrapper` does, a module trained in full trains a private copy of its
parameters: a head tied to the input embeddings is untied by it (PEFT's default, without
`ensure_weight_tying`), so `--train-modules lm_head` leaves the embeddings as the base has them.
The copies stay in the base's dtype, as PEFT's do. New tokens (`--add-tokens`) resize the
embeddings and the head; both are then saved whole with the adapter, as PEFT's
`save_embedding_layers` does for a resized vocabulary.
"""

from __future__ import annotations

import os
import re
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

_RESIZED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose vocabulary `add_tokens` grew


def train_in_full(model: nn.Module, suffixes: Sequence[str], lora_targets: Sequence[str]) -> tuple[str, ...]:
    """Give the modules whose paths end in `suffixes` trainable copies of their parameters; their paths."""
    names: list[str] = []
    for suffix in suffixes:
        found = [n for n, _ in model.named_modules() if n and (n == suffix or n.endswith("." + suffix))]
        if not found:
            raise UsageError(f"--train-modules {suffix!r} matches no module of the model",
                             hint="name a module path or its last part, e.g. lm_head,embed_tokens")  # fmt: skip
        names += [n for n in found if n not in names]
    for name in names:
        if name in lora_targets:
            raise UsageError(f"module {name!r} is both a LoRA target and trained in full",
                             hint="leave it out of --targets or out of --train-modules")  # fmt: skip
        for module in model.get_submodule(name).modules():
            for key, p in list(module._parameters.items()):
                if p is not None and not p.dtype.is_floating_point:
                    raise UsageError(f"module {name!r} is quantized and cannot be trained in full",
                                     hint="train quantized layers through LoRA (--targets)")  # fmt: skip
                if p is not None:
                    module._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=True)
    return tuple(names)


def add_tokens(model: Any, tokenizer: Any, tokens: Sequence[str], seed: int) -> int:
    """Add `tokens` the tokenizer lacks (as special tokens) and resize the embeddings; the number added.

    The new rows are transformers' mean-resizing draw (the old rows' mean and covariance), seeded by `seed`.
    """
    added = int(tokenizer.add_tokens(list(tokens), special_tokens=True))
    if added:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer))
        _RESIZED.add(model)
    return added


def template_tokens(template: str, tokenizer: Any) -> tuple[str, ...]:
    """The `<|name|>` tokens a chat template writes that the tokenizer does not hold as one token, in order."""
    vocab = tokenizer.get_vocab()
    found = dict.fromkeys(re.findall(r"<\|[\w.-]+\|>", template))
    return tuple(t for t in found if t not in vocab)


def full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what the adapter holds whole: parameters trained in full, and resized embeddings (CPU)."""
    lora = {"lora_A", "lora_B", "magnitude"}
    out: dict[str, torch.Tensor] = {
        n: p for n, p in model.named_parameters() if p.requires_grad and n.rpartition(".")[2] not in lora
    }
    if model in _RESIZED:
        out.update(embedding_tensors(model))
    return {n.replace(".base_layer.", "."): t.detach().to("cpu", copy=True) for n, t in sorted(out.items())}


def embedding_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The input and output embedding weights by checkpoint name (a LoRA wrapper's base layer as itself)."""
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        weight = getattr(module, "base_layer", module).weight
        out[f"{paths[id(module)]}.weight"] = weight
    return out


def save_tokenizer(tokenizer: Any, adapter_dir: Path) -> None:
    """Write the tokenizer's files into the written adapter directory, each file atomically."""
    with tempfile.TemporaryDirectory(dir=adapter_dir.parent) as tmp:
        for name in tokenizer.save_pretrained(tmp):
            source = Path(name)
            if source.is_file():
                os.replace(source, adapter_dir / source.name)
