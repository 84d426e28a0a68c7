"""What resize, combine and rescale return: the new adapter and what each module went through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapter import Adapter
    from .budget import Allocation


@dataclass(frozen=True)
class ModuleChange:
    """What an op did to one module: ranks before and after, and ‖ΔW − ΔW'‖_F / ‖ΔW‖_F (float64)."""

    module: str
    rank_in: int
    rank_out: int
    rel_error: float


@dataclass(frozen=True)
class AlgebraResult:
    """An op's output adapter, its per-module report, and warnings for the user."""

    adapter: Adapter
    report: tuple[ModuleChange, ...]
    warnings: tuple[str, ...] = ()
    budget: Allocation | None = None  # set by `resize_to_budget`

    def to_dict(self) -> dict[str, Any]:
        """The `--json` document (the CLI adds where it wrote the adapter, in which format)."""
        return {
            "content_hash": self.adapter.content_hash(),
            "modules": [vars(r) for r in self.report],
            "warnings": list(self.warnings),
            **({"budget": self.budget.to_dict()} if self.budget is not None else {}),
        }

    def metrics(self) -> dict[str, object]:
        """Error figures for the lineage record."""
        errors = [r.rel_error for r in self.report]
        return {
            "max_rel_error": max(errors, default=0.0),
            "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
            "modules": {r.module: {"rank": r.rank_out, "rel_error": float(f"{r.rel_error:.4g}")} for r in self.report},
            **({"budget": self.budget.to_dict()} if self.budget is not None else {}),
        }
