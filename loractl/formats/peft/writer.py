"""PEFT's writer: the canonical adapter translated to PEFT keys, `adapter_config.json` and the record."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

from ... import lineage
from ...adapter import Adapter
from ...errors import AdapterError
from .._record import record_for
from .config import exact_alpha, json_number, most_common

PREFIX = "base_model.model."
# Config keys loractl derives from the tensors; everything else in a source config passes through.
_DERIVED = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
    "fan_in_fan_out", "target_modules", "modules_to_save", "base_model_name_or_path", "revision",
    "task_type", "peft_type", "layers_to_transform", "layers_pattern", "exclude_modules",
}  # fmt: skip


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Every tensor under its PEFT key."""
    out: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        base = PREFIX + name
        if m.kind == "embedding":
            out[base + ".lora_embedding_A"], out[base + ".lora_embedding_B"] = m.A, m.B
        else:
            out[base + ".lora_A.weight"], out[base + ".lora_B.weight"] = m.A, m.B
        if m.magnitude is not None:
            out[base + ".lora_magnitude_vector"] = m.magnitude
        if _has_bias(adapter):
            out[base + ".lora_B.bias"] = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.B.dtype)
    for key, t in adapter.full_tensors.items():
        module, _, leaf = key.rpartition(".")
        out[PREFIX + (f"{module}.base_layer.{leaf}" if module in adapter.modules else key)] = t
    return out


def peft_config(adapter: Adapter) -> tuple[dict[str, Any], dict[str, float]]:
    """adapter_config.json for `adapter`, and the exact scales its alphas cannot express."""
    mods = dict(sorted(adapter.modules.items()))  # sorted: ties in most_common must not depend on dict order
    dora = {m.magnitude is not None for m in mods.values()}
    if len(dora) > 1:
        raise AdapterError(
            "PEFT cannot hold DoRA and plain LoRA modules in one adapter", hint="merge or split them first"
        )
    rslora = bool(mods) and all(m.scale_rule == "alpha/sqrt(r)" for m in mods.values())
    alphas, inexact = {}, {}
    for name, m in mods.items():
        alpha = exact_alpha(m.scale, m.rank, rslora, m.alpha)
        if alpha is None:
            alpha, inexact[name] = m.scale * (m.rank**0.5 if rslora else m.rank), m.scale
        alphas[name] = alpha
    r = most_common([m.rank for m in mods.values()], 8)
    lora_alpha = most_common(list(alphas.values()), 8)
    source = dict(adapter.meta.extra.get("config") or {})
    config = {k: v for k, v in source.items() if k not in _DERIVED}
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=json_number(lora_alpha),
        rank_pattern={_pattern_key(n, mods): m.rank for n, m in mods.items() if m.rank != r},
        alpha_pattern={_pattern_key(n, mods): json_number(a) for n, a in alphas.items() if a != lora_alpha},
        use_rslora=rslora,
        use_dora=dora == {True},
        lora_bias=_has_bias(adapter),
        fan_in_fan_out=_fan_in_fan_out(adapter),
        target_modules=sorted(mods),
        modules_to_save=sorted({k.rpartition(".")[0] for k in adapter.full_tensors if k.rpartition(".")[0] not in mods})
        or None,
        base_model_name_or_path=adapter.meta.base_model,
        revision=adapter.meta.base_revision,
        task_type=adapter.meta.task_type,
    )
    config.setdefault("bias", "none")
    config.setdefault("inference_mode", True)
    return config, inexact


def _pattern_key(module: str, modules: dict[str, Any]) -> str:
    """The rank/alpha pattern key naming `module` only: PEFT matches keys as dotted suffixes, so a module that is
    a suffix of another (Flux's top-level `proj_out` and `single_transformer_blocks.0.proj_out`) is anchored."""
    suffix_of_another = any(m.endswith("." + module) for m in modules)
    return ("^" if suffix_of_another else "") + re.escape(module)


def peft_record(adapter: Adapter, scales: dict[str, float]) -> lineage.Record:
    """`record_for` plus the per-module facts a PEFT config says only once (Conv1D flag, lora_bias)."""
    implied = {n: _fan_in_fan_out(adapter) and m.kind == "linear" for n, m in adapter.modules.items()}
    padded = sorted(n for n, m in adapter.modules.items() if m.bias is None) if _has_bias(adapter) else []
    return replace(
        record_for(adapter, scales),
        fan_in_fan_out={
            n: m.fan_in_fan_out for n, m in sorted(adapter.modules.items()) if m.fan_in_fan_out != implied[n]
        },
        padded_bias=tuple(padded),
    )


def _has_bias(adapter: Adapter) -> bool:
    """PEFT's lora_bias is all or nothing: when any module has a bias, every module gets one (zeros)."""
    return any(m.bias is not None for m in adapter.modules.values())


def _fan_in_fan_out(adapter: Adapter) -> bool:
    """The config's one flag; modules that differ are listed in the record (PEFT itself decides by layer type)."""
    return any(m.fan_in_fan_out for m in adapter.modules.values())
