"""The optimizer's parameter groups: one group, or LoRA+'s (B learns `lora_plus_ratio` times faster).

LoRA+ (Hayou et al. 2024) as PEFT's `create_loraplus_optimizer` groups the parameters: the LoRA
embedding's factors at a fixed `lora_plus_embedding_lr` (PEFT's default 1e-6); `lora_B` and every
1-D parameter (DoRA's magnitude, trained norms and biases) at lr × ratio, without weight decay for
biases and LayerNorm weights; the rest (A, modules trained in full) at lr. Each group carries its
`lr_ratio`, the factor the loop multiplies the scheduled lr by, so warmup and decay scale every
group alike, as a torch scheduler scales each group's initial lr. LoRA factors are told apart by
name, not shape: under FSDP (`use_orig_params`) each is a 1-D view of its shard
(`tests/test_train_fsdp.py::test_lora_plus_groups_under_fsdp_match_one_process`, slow).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import TrainConfig
from .lora_embedding import LoraEmbedding


def param_groups(net: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters of `net` as optimizer groups, each with its `lr_ratio` (empty groups left out)."""
    if config.lora_plus_ratio is None:
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr_ratio": 1.0}]
    ratio, decay = config.lora_plus_ratio, config.weight_decay
    groups: dict[str, dict[str, Any]] = {
        "A": {"params": [], "lr_ratio": 1.0, "weight_decay": decay},
        "embedding": {"params": [], "lr_ratio": config.lora_plus_embedding_lr / config.lr, "weight_decay": decay},
        "B": {"params": [], "lr_ratio": ratio, "weight_decay": decay},
        "B_no_decay": {"params": [], "lr_ratio": ratio, "weight_decay": 0.0},
    }
    trainable = {id(p): p for p in net.parameters() if p.requires_grad}  # what one group would hold
    for module in net.modules():
        for name, param in module.named_parameters(recurse=False):
            if trainable.pop(id(param), None) is not None:  # each once; never a wrapper's own (FSDP's flat) one
                groups[_group(module, name, param)]["params"].append(param)
    groups["A"]["params"] += trainable.values()
    return [g for g in groups.values() if g["params"]]


def _group(module: nn.Module, name: str, param: nn.Parameter) -> str:
    if isinstance(module, LoraEmbedding):
        return "embedding"
    if name == "lora_A":  # by name first: under FSDP (use_orig_params) every factor is a 1-D view of its shard
        return "A"
    if name in ("lora_B", "magnitude") or param.ndim == 1:
        return "B_no_decay" if "bias" in name or isinstance(module, nn.LayerNorm) else "B"
    return "A"
