"""Resize: the optimal lower-rank adapter for each module, computed from the factors alone.

Each module's ΔW = scale · B · A is re-factored through `factored_svd` (exact, never (out, in))
and truncated by a `RankRule`; the scale is kept (alpha follows the new rank), as kohya's
resize_lora.py does. A module the rule would not shrink is kept bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

from .. import lineage
from ..adapter import Adapter, LoraModule
from .algebra_result import AlgebraResult, ModuleChange
from .lowrank import RankRule, factored_svd, matrices, rebuild, truncate


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


def _resize_module(name: str, m: LoraModule, rule: RankRule) -> tuple[LoraModule, ModuleChange]:
    b, a = matrices(m)
    cut = truncate(factored_svd([b], [a]), rule)
    if cut.rank >= m.rank:
        return m, ModuleChange(name, m.rank, m.rank, 0.0)
    out = rebuild(m, cut.B, cut.A, m.scale, m.A.dtype)
    return out, ModuleChange(name, m.rank, cut.rank, cut.rel_error)
