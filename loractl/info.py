"""What an adapter is, from headers and config alone (no tensor data, no torch).

`inspect` without `--stats`, `validate`'s structural checks and every plan use these; the
vocabulary (`ModuleKind`, `ScaleRule`) and the scale formula are defined here, torch-free, and
shared with the tensor-holding `adapter.LoraModule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .findings import Finding
from .lineage import Record

ScaleRule = Literal["alpha/r", "alpha/sqrt(r)", "absolute", "unit"]
ModuleKind = Literal["linear", "conv", "embedding"]


def scale_from_alpha(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scale: alpha/r, or alpha/√r for rsLoRA (computed in float64)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module as the file describes it; `keys` maps role (A, B, ...) to tensor key."""

    kind: ModuleKind
    rank: int
    in_features: int
    out_features: int
    scale: float
    alpha: float | None
    scale_rule: ScaleRule
    fan_in_fan_out: bool
    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def dora(self) -> bool:
        return "magnitude" in self.keys

    @property
    def bias(self) -> bool:
        return "bias" in self.keys

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shapes["A"][2:]


@dataclass(frozen=True)
class FullTensorInfo:
    """A non-LoRA tensor that replaces the base's tensor of the same name."""

    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter file set described without reading tensor data."""

    path: Path
    format: str
    files: tuple[Path, ...]
    modules: dict[str, ModuleInfo]
    full_tensors: dict[str, FullTensorInfo]
    base_model: str | None = None
    base_revision: str | None = None
    task_type: str | None = None
    record: Record | None = None
    config: dict[str, Any] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()

    @property
    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def num_parameters(self) -> int:
        full = sum(math.prod(t.shape) for t in self.full_tensors.values())
        return full + sum(m.num_parameters for m in self.modules.values())

    @property
    def dtypes(self) -> list[str]:
        found = {d for m in self.modules.values() for d in m.dtypes.values()}
        return sorted(found | {t.dtype for t in self.full_tensors.values()})

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]
