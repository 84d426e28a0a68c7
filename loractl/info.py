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
class Factor:
    """One side of a LyCORIS module: a full matrix, or a low-rank pair `_a @ _b` (Tucker: through a core)."""

    shape: tuple[int, int]  # the side as a matrix: (out part, in part), kernel left out
    rank: int | None  # None: stored full
    tucker: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "rank": self.rank, "tucker": self.tucker}

    def describe(self) -> str:
        """`48×64 r4`, `4×4 full`, `32×16 r4 tucker`."""
        what = "full" if self.rank is None else f"r{self.rank}"
        return f"{self.shape[0]}×{self.shape[1]} {what}{' tucker' * self.tucker}"


@dataclass(frozen=True)
class Structure:
    """A LyCORIS LoHa or LoKr module as stored: ΔW = scale · (w1 ⊙ w2) or scale · kron(w1, w2).

    loractl reads it as the exact LoRA of rank `rank` (the module's `rank`): LoHa's Hadamard product
    of ranks r1, r2 is B·A of rank r1·r2, LoKr's Kronecker product of ranks k1, k2 of rank k1·k2, and
    a product that would reach min(out, in) is held as the dense ΔW times an identity.
    """

    algo: Literal["LoHa", "LoKr"]
    w1: Factor
    w2: Factor
    kernel: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "w1": self.w1.to_dict(), "w2": self.w2.to_dict(), "kernel": list(self.kernel)}

    def describe(self) -> str:
        """`LoHa (48×64 r4) ⊙ (48×64 r4)`, `LoKr (4×4 full) ⊗ (8×4 r2 tucker) 3×3`."""
        op = "⊙" if self.algo == "LoHa" else "⊗"
        kernel = f" {'×'.join(map(str, self.kernel))}" if self.kernel else ""
        return f"{self.algo} ({self.w1.describe()}) {op} ({self.w2.describe()}){kernel}"


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
    structure: Structure | None = None  # LyCORIS LoHa/LoKr: keys and shapes are then the stored tensors'

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
        return self.structure.kernel if self.structure is not None else self.shapes["A"][2:]


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
