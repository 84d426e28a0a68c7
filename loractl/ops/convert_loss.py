"""What a conversion loses, measured as a change of the adapter's EFFECT on its base.

Comparing scale·B·A alone calls a conversion exact when it dropped DoRA magnitudes, lora_B
biases or full tensors, which change what the adapter does. Each loss is measured against
the adapter's whole effect (the change it makes to every base tensor it touches):

    update_change = ‖effect lost‖_F / ‖whole effect‖_F
    weight_change = ‖W'_out − W'_src‖_F / ‖W'_src‖_F   over the merged tensors the loss touches

Without a base only what is base-independent is measured (biases, dropped LoRA modules, in an
adapter without DoRA or full tensors); DoRA and full tensors need the base weights (`--base`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, LoraModule
from ..formats.options import Feature
from ..io.checkpoint import Checkpoint
from .algebra_result import ModuleChange
from .merge_kernel import deltas_norm, merged_float32, module_delta

LOSS_NAMES: dict[Feature, str] = {
    "dora": "DoRA magnitudes",
    "bias": "lora_B biases",
    "embedding": "embedding LoRA modules",
    "conv": "conv LoRA modules",
    "fan_in_fan_out": "the fan_in_fan_out (GPT-2 Conv1D) flag",
    "full_tensors": "full tensors",
}


@dataclass(frozen=True)
class Loss:
    """One thing the target cannot hold: what, where, and how much of the effect it carried."""

    what: str
    count: int
    modules: tuple[str, ...]  # module paths, or tensor names for full tensors
    update_change: float | None  # share of the adapter's effect lost; None when it cannot be measured
    weight_change: float | None  # relative change of the merged weights (needs the base)
    unmeasured: str = "give --base to measure it"  # why `update_change` is None

    def describe(self) -> str:
        """`DoRA magnitudes (4 modules): 87% of the adapter's effect, 0.41% of the merged weights`."""
        head = f"{self.what} ({self.count} {'tensor' if self.what == 'full tensors' else 'module'}{'s' * (self.count != 1)})"
        if self.update_change is None:
            return f"{head}: effect not measured, {self.unmeasured}"
        text = f"{head}: {_percent(self.update_change)} of the adapter's effect"
        return text + (
            f", {_percent(self.weight_change)} of the merged weights" if self.weight_change is not None else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "count": self.count,
            "modules": list(self.modules),
            "update_change": self.update_change,
            "weight_change": self.weight_change,
        }


TRUNCATION = "rank truncation"


def truncation_loss(adapter: Adapter, changes: tuple[ModuleChange, ...], exact: float) -> Loss | None:
    """The share of `adapter`'s effect a per-module rank truncation drops (None when every module's
    error is within `exact`): √(Σ errᵢ²·‖ΔWᵢ‖² / Σ ‖ΔWᵢ‖²), from the factors (no base needed)."""
    lossy = tuple(c for c in changes if c.rel_error > exact)
    if not lossy:
        return None
    norms = {n: deltas_norm([module_delta(m, 1.0)]) ** 2 for n, m in adapter.modules.items()}
    total = sum(norms.values())
    lost = sum(c.rel_error**2 * norms[c.module] for c in changes)
    return Loss(TRUNCATION, len(lossy), tuple(c.module for c in lossy), math.sqrt(lost / total) if total else 0.0, None)


def measure_losses(adapter: Adapter, lost: list[Feature], base: Path | None) -> tuple[Loss, ...]:
    """A `Loss` per feature in `lost`, measured with the base weights when `base` is given."""
    if not lost:
        return ()
    if base is None:
        return tuple(_measure(adapter, f, _Effects(adapter, None)) for f in lost)
    with Checkpoint(base) as ckpt:
        effects = _Effects(adapter, ckpt)
        return tuple(_measure(adapter, f, effects) for f in lost)


def affected(adapter: Adapter, feature: Feature) -> tuple[str, ...]:
    """The modules (or full tensor names) that carry `feature`."""
    if feature == "full_tensors":
        return tuple(sorted(adapter.full_tensors))
    has: dict[Feature, Callable[[LoraModule], bool]] = {
        "dora": lambda m: m.magnitude is not None,
        "bias": lambda m: m.bias is not None,
        "embedding": lambda m: m.kind == "embedding",
        "conv": lambda m: m.kind == "conv",
        "fan_in_fan_out": lambda m: m.fan_in_fan_out,
    }
    test = has.get(feature)
    return tuple(sorted(n for n, m in adapter.modules.items() if test is not None and test(m)))


def _measure(adapter: Adapter, feature: Feature, effects: _Effects) -> Loss:
    names = affected(adapter, feature)
    lost_sq, merged_sq = 0.0, 0.0
    for name in names:
        pair = effects.lost(name, feature)
        if pair is None:
            return Loss(LOSS_NAMES[feature], len(names), names, None, None, _unmeasured(feature, effects))
        lost_sq, merged_sq = lost_sq + pair[0], merged_sq + (pair[1] or 0.0)
    total = effects.total_sq()
    update = math.sqrt(lost_sq / total) if total else None
    weight = math.sqrt(lost_sq / merged_sq) if effects.ckpt is not None and merged_sq else None
    return Loss(LOSS_NAMES[feature], len(names), names, update, weight, _unmeasured(feature, effects))


def _unmeasured(feature: Feature, effects: _Effects) -> str:
    """Why a loss has no share: the Conv1D flag is a layout, not a part of ΔW; else the base is missing or lacks a tensor."""
    if feature == "fan_in_fan_out":
        return "a layout the target cannot record: a consumer that does not take it from the base transposes ΔW"
    return "give --base to measure it" if effects.ckpt is None else "the base lacks a tensor the adapter changes"


class _Effects:
    """Squared effect norms per module, from the factors alone or with the base weights (float32 merge)."""

    def __init__(self, adapter: Adapter, ckpt: Checkpoint | None) -> None:
        self.adapter, self.ckpt = adapter, ckpt

    def lost(self, name: str, feature: Feature) -> tuple[float, float | None] | None:
        """(‖effect lost‖², ‖merged source tensors‖² or None without a base); None: not measurable."""
        if feature == "full_tensors":
            return self._full(name)
        m = self.adapter.modules[name]
        if feature == "bias":
            return self._bias(name, m)
        if feature in ("embedding", "conv"):
            return self._weight(name, m, None)
        if feature == "dora":
            return self._weight(name, m, replace(m, magnitude=None))
        return None  # fan_in_fan_out: the update would be applied transposed, not smaller

    def total_sq(self) -> float | None:
        """‖the adapter's whole effect‖²; None without a base when DoRA or full tensors make it base-dependent."""
        a = self.adapter
        if self.ckpt is None and a.full_tensors:
            return None
        parts = [self._weight(n, m, None) for n, m in a.modules.items()]  # each with its module's bias
        parts += [self._full(k) for k in a.full_tensors]
        return None if any(x is None for x in parts) else sum(x[0] for x in parts if x is not None)

    def _weight(self, name: str, m: LoraModule, kept: LoraModule | None) -> tuple[float, float | None] | None:
        """The weight effect that changes when `m` becomes `kept` (None: the module is dropped)."""
        if self.ckpt is None:
            if m.magnitude is not None:
                return None
            return deltas_norm([module_delta(m, 1.0)]) ** 2 + (_bias_sq(m) if kept is None else 0.0), None
        key = f"{name}.weight"
        if key not in self.ckpt:
            return None
        w = self.ckpt.get(key)
        src = _merged(w, m)
        out = _merged(w, kept) if kept is not None else w.float()
        bias = _bias_sq(m) if kept is None else 0.0
        return _sq(src - out) + bias, _sq(src)

    def _bias(self, name: str, m: LoraModule) -> tuple[float, float | None] | None:
        if self.ckpt is None:
            return _bias_sq(m), None
        key = f"{name}.bias"
        if key not in self.ckpt:
            return None
        assert m.bias is not None
        return _bias_sq(m), _sq(self.ckpt.get(key).float() + m.scale * m.bias.float())

    def _full(self, key: str) -> tuple[float, float | None] | None:
        if self.ckpt is None or key not in self.ckpt:
            return None
        full = self.adapter.full_tensors[key].float()
        return _sq(full - self.ckpt.get(key).float()), _sq(full)


def _merged(weight: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """W' in float32: W + scale·B·A, or DoRA's m ⊙ (W + ΔW)/‖W + ΔW‖ (merge's own kernel)."""
    return merged_float32(weight, [module_delta(m, 1.0)])[0]


def _bias_sq(m: LoraModule) -> float:
    return 0.0 if m.bias is None else _sq(m.scale * m.bias.float())


def _sq(t: torch.Tensor) -> float:
    return float(t.double().square().sum())


def _percent(x: float | None) -> str:
    assert x is not None
    return f"{100 * x:.3g}%"
