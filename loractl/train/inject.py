"""Put `LoraLinear` layers into any `nn.Module` by target names, and freeze everything else.

Targets (as PEFT reads `target_modules`): a list of name suffixes (`q_proj` matches
`model.layers.0.self_attn.q_proj`), a regex matched against the whole module path, or
`all-linear` (every linear layer but the output head). A pattern that matches nothing is an
error, so a typo never trains an adapter with a missing target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .config import Targets, TrainConfig, is_residual_init
from .fused_blocks import fuse
from .lora_embedding import LoraEmbedding
from .lora_init import residual_init_
from .lora_layers import LoraLinear, is_adaptable
from .saved_modules import train_in_full

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Injection:
    """What `inject` did: the adapted module paths and the parameter counts after freezing."""

    modules: tuple[str, ...]
    trainable: int
    total: int
    full: tuple[str, ...] = ()  # modules trained in full (modules_to_save)

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def inject(model: nn.Module, config: TrainConfig | None = None) -> Injection:
    """Wrap the targeted layers of `model` in place; only LoRA factors require grad afterwards.

    A is drawn from a generator seeded with `config.seed`, so the same config gives the same start.
    An embedding named in the targets gets PEFT's embedding LoRA (`LoraEmbedding`); the modules in
    `config.train_modules` are trained in full (PEFT's `modules_to_save`, see `saved_modules`).
    Llama-family RMSNorms and gated MLPs get their fused autograd forwards (`fused_blocks`).
    `config.init` pissa/olora also rewrites each adapted base weight to its residual (`lora_init`).
    """
    config = config or TrainConfig()
    if any(isinstance(m, (LoraLinear, LoraEmbedding)) for m in model.modules()):
        raise UsageError("the model already has LoRA layers", hint="inject into a fresh copy of the base")
    chosen = select_modules(model, config.targets, config.exclude)
    generator = torch.Generator().manual_seed(config.seed)
    model.requires_grad_(False)
    full = train_in_full(model, config.train_modules or (), chosen)
    draws = config.init.startswith("pissa_niter_")  # torch.svd_lowrank draws from torch's RNG (as in PEFT)
    with torch.random.fork_rng(enabled=draws):
        if draws:
            torch.manual_seed(config.seed)
        for name in chosen:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, _wrap(name, getattr(parent, leaf), config, generator))
    fuse(model)
    return Injection(tuple(chosen), *parameter_counts(model), full=full)


def _wrap(name: str, layer: nn.Module, config: TrainConfig, generator: torch.Generator) -> nn.Module:
    """The LoRA layer for `layer`: `LoraEmbedding` for an embedding, else `LoraLinear`."""
    if not isinstance(layer, nn.Embedding):
        lora = LoraLinear(layer, config.rank, config.alpha, rslora=config.rslora, dropout=config.dropout,
                          init=config.init, generator=generator, dora=config.dora)  # fmt: skip
        if is_residual_init(config.init):
            residual_init_(lora, config.init, name)
        return lora
    if config.dora:
        raise UsageError(f"--dora on the embedding {name!r} is not supported",
                         hint="leave the embedding out of --targets, or train it in full with --train-modules")  # fmt: skip
    if config.fsdp:
        raise UsageError(f"--fsdp adapts linear layers only, not the embedding {name!r}",
                         hint="leave the embedding out of --targets, or train with one process or DDP")  # fmt: skip
    # PiSSA/OLoRA are for linear layers: an embedding keeps PEFT's embedding init (A = 0), as PEFT does.
    return LoraEmbedding(layer, config.rank, config.alpha, rslora=config.rslora, generator=generator)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of `model`, as PEFT's `print_trainable_parameters` counts them.

    A bitsandbytes 4-bit weight (`Params4bit`) packs two values per byte of its storage, so its numel
    is half (or less) of the parameters it holds: it counts numel × 2 × its element size, as in PEFT.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def select_modules(model: nn.Module, targets: Targets, exclude: Targets | None = None) -> list[str]:
    """Paths of the adaptable layers `targets` names, minus `exclude`, in model order.

    Embeddings are adaptable when named (`embed_tokens`, or a regex), never by `all-linear` (as in PEFT).
    """
    candidates = [name for name, m in model.named_modules() if name and (is_adaptable(m) or _embedding(m))]
    if targets == ALL_LINEAR:
        head = _output_head(model)
        chosen = [n for n in candidates if n != head and not _embedding(model.get_submodule(n))]
    else:
        chosen = _match(candidates, targets, required=True)
    if exclude is not None:
        dropped = set(_match(chosen, exclude, required=False))
        chosen = [n for n in chosen if n not in dropped]
    if not chosen:
        raise UsageError(f"targets {_show(targets)} leave no layer to adapt", hint=_available(candidates))
    return chosen


def _embedding(module: nn.Module) -> bool:
    return type(module) is nn.Embedding


def _match(names: list[str], pattern: Targets, *, required: bool) -> list[str]:
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise UsageError(f"target pattern {pattern!r} is not a valid regex: {e}") from None
        matched = [n for n in names if regex.fullmatch(n)]
        if required and not matched:
            raise UsageError(f"target pattern {pattern!r} matches no linear layer", hint=_available(names))
        return matched
    hits: set[str] = set()
    for suffix in pattern:
        found = {n for n in names if n == suffix or n.endswith("." + suffix)}
        if required and not found:
            raise UsageError(f"target {suffix!r} matches no linear layer", hint=_available(names))
        hits |= found
    return [n for n in names if n in hits]


def _output_head(model: nn.Module) -> str | None:
    """The output projection's path (transformers' `get_output_embeddings`, else a leaf named lm_head)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or (head is None and name.rpartition(".")[2] == "lm_head"):
            return str(name)
    return None


def _available(names: list[str]) -> str:
    leaves = sorted({n.rpartition(".")[2] for n in names})
    return f"linear layers in this model end in: {', '.join(leaves[:12]) or 'none'}"


def _show(targets: Targets) -> str:
    return repr(targets) if isinstance(targets, str) else ",".join(targets)
