"""Resize: the optimal lower-rank adapter for each module, computed from the factors alone.

Each module's ΔW = scale · B · A is re-factored through `factored_svd` (exact, never (out, in))
and truncated by a `RankRule`; the scale is kept (alpha follows the new rank), as kohya's
resize_lora.py does. A module the rule would not shrink is kept bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import lineage
from ..adapter import Adapter, LoraModule
from .lowrank import RankRule, factored_svd, matrices, rebuild, truncate


@dataclass(frozen=True)
class ModuleReport:
    """What an op did to one module: ranks before and after, and ‖ΔW − ΔW'‖_F / ‖ΔW‖_F (float64)."""

    module: str
    rank_in: int
    rank_out: int
    rel_error: float


@dataclass(frozen=True)
class AlgebraResult:
    """An op's output adapter, its per-module report, and warnings for the user."""

    adapter: Adapter
    report: tuple[ModuleReport, ...]
    warnings: tuple[str, ...] = ()

    def metrics(self) -> dict[str, object]:
        """Error figures for the lineage record."""
        errors = [r.rel_error for r in self.report]
        return {
            "max_rel_error": max(errors, default=0.0),
            "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
            "modules": {r.module: {"rank": r.rank_out, "rel_error": float(f"{r.rel_error:.4g}")} for r in self.report},
        }


def resize(adapter: Adapter, rule: RankRule) -> AlgebraResult:
    """Truncate every module of `adapter` optimally (Eckart–Young) to the rank `rule` chooses."""
    rule.check()
    adapter.check()
    modules: dict[str, LoraModule] = {}
    report = []
    for name, m in adapter.modules.items():
        modules[name], rep = _resize_module(name, m, rule)
        report.append(rep)
    warnings: tuple[str, ...] = ()
    if any(m.magnitude is not None for m in adapter.modules.values()):
        warnings = ("DoRA magnitudes are kept as they are; the reported errors are those of the LoRA part B·A",)
    result = AlgebraResult(replace(adapter, modules=modules, warnings=()), tuple(report), warnings)
    entry = lineage.new_entry("resize", rule.params(), [adapter.content_hash()], result.metrics())
    return replace(result, adapter=result.adapter.with_lineage(entry))


def _resize_module(name: str, m: LoraModule, rule: RankRule) -> tuple[LoraModule, ModuleReport]:
    b, a = matrices(m)
    cut = truncate(factored_svd([b], [a]), rule)
    if cut.rank >= m.rank:
        return m, ModuleReport(name, m.rank, m.rank, 0.0)
    out = rebuild(m, cut.B, cut.A, m.scale, m.A.dtype)
    return out, ModuleReport(name, m.rank, cut.rank, cut.rel_error)
