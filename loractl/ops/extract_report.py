"""What an extraction kept and what it lost: per module, per skipped tensor, and in total."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .budget import Allocation

Status = Literal["identical", "saved-full", "not-extracted"]


@dataclass(frozen=True)
class ExtractedModule:
    """One extracted module.

    Attributes:
        rel_error: ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F with the factors as stored (after the dtype cast).
        energy: the fraction of ‖ΔW‖²_F the kept singular values carry.
        delta_ratio: ‖ΔW‖_F / ‖W0‖_F, how far fine-tuning moved this weight.
        delta_sq, residual_sq: ‖ΔW‖²_F and the squared error, kept for the totals.
    """

    module: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float
    energy: float
    delta_ratio: float
    method: str
    delta_sq: float
    residual_sq: float


@dataclass(frozen=True)
class TensorNote:
    """A tensor that was not factored, and why; `not-extracted` ones changed and are not reproduced."""

    name: str
    status: Status
    reason: str


@dataclass(frozen=True)
class ExtractReport:
    modules: tuple[ExtractedModule, ...]
    notes: tuple[TensorNote, ...]
    warnings: tuple[str, ...] = ()
    budget: Allocation | None = None  # --budget: the allocation and the uniform-rank comparison

    def not_extracted(self) -> list[TensorNote]:
        return [n for n in self.notes if n.status == "not-extracted"]

    def totals(self) -> dict[str, Any]:
        """Counts, and the error and energy over all extracted modules together (ΔW-weighted)."""
        delta = sum(m.delta_sq for m in self.modules)
        residual = sum(m.residual_sq for m in self.modules)
        kept = sum(m.energy * m.delta_sq for m in self.modules)
        count = {s: sum(n.status == s for n in self.notes) for s in ("identical", "saved-full", "not-extracted")}
        return {
            "modules": len(self.modules),
            "rel_error": math.sqrt(residual / delta) if delta else 0.0,
            "energy": kept / delta if delta else 1.0,
            "max_rank": max((m.rank for m in self.modules), default=0),
            **{k.replace("-", "_"): v for k, v in count.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (the `--json` output and the lineage metrics)."""
        modules = [{k: v for k, v in asdict(m).items() if k not in ("delta_sq", "residual_sq")} for m in self.modules]
        return {
            "totals": self.totals(),
            "modules": modules,
            "not_extracted": [{"name": n.name, "reason": n.reason} for n in self.not_extracted()],
            "saved_full": [n.name for n in self.notes if n.status == "saved-full"],
            "identical": [n.name for n in self.notes if n.status == "identical"],
            "warnings": list(self.warnings),
            **({"budget": self.budget.to_dict()} if self.budget is not None else {}),
        }
