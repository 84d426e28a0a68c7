"""Resize: the optimal lower-rank adapter for each module, computed from the factors alone.

Each module's ΔW = scale · B · A is re-factored through `factored_svd` (exact, never (out, in))
and truncated by a `RankRule`; the scale is kept (alpha follows the new rank), as kohya's
resize_lora.py does. A module the rule would not shrink is kept bit for bit. `resize_to_budget`
chooses the ranks of all modules together for a parameter budget (`budget.allocate`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .. import lineage
from ..adapter import Adapter, LoraModule
from .algebra_result import AlgebraResult, ModuleChange
from .budget import Allocation, allocate
from .lowrank import RankRule, factored_svd, matrices, rebuild, truncate

if TYPE_CHECKING:
    import torch


def resize(adapter: Adapter, rule: RankRule, *, device: str = "cpu") -> AlgebraResult:
    """Truncate every module of `adapter` optimally (Eckart–Young) to the rank `rule` chooses.

    `device` (cpu, cuda, mps, auto) runs the float64 factor algebra there (the CPU for mps).
    """
    from .devices import float64_device, resolve_device

    rule.check()
    adapter.check()
    where = float64_device(resolve_device(device))
    return _resize_all(adapter, {name: rule for name in adapter.modules}, rule.params(), None, where)


def resize_to_budget(adapter: Adapter, budget: int) -> AlgebraResult:
    """Truncate every module so that the factors hold at most `budget` parameters in total, losing the
    least Σ ‖ΔW − ΔW'‖²_F over modules (the ranks chosen together; see `budget.allocate`)."""
    adapter.check()
    spectra, totals, costs = {}, {}, {}
    for name, m in adapter.modules.items():
        b, a = matrices(m)
        s2 = factored_svd([b], [a]).S.square() * m.scale**2  # σ² of ΔW = scale · B A
        spectra[name], totals[name] = s2.tolist(), float(s2.sum())
        costs[name] = int(b.shape[0] + a.shape[1])
    chosen = allocate(spectra, totals, costs, budget)
    rules = {name: RankRule(rank=k) for name, k in chosen.ranks.items()}
    return _resize_all(adapter, rules, {"budget": budget}, chosen, None)


def _resize_all(
    adapter: Adapter,
    rules: dict[str, RankRule],
    params: dict[str, float | int],
    budget: Allocation | None,
    device: torch.device | None,
) -> AlgebraResult:
    modules: dict[str, LoraModule] = {}
    report = []
    for name, m in adapter.modules.items():
        modules[name], rep = _resize_module(name, m, rules[name], device)
        report.append(rep)
    warnings: tuple[str, ...] = ()
    if any(m.magnitude is not None for m in adapter.modules.values()):
        warnings = ("DoRA magnitudes are kept as they are; the reported errors are those of the LoRA part B·A",)
    result = AlgebraResult(replace(adapter, modules=modules, warnings=()), tuple(report), warnings, budget)
    entry = lineage.new_entry("resize", params, [adapter.content_hash()], result.metrics())
    return replace(result, adapter=result.adapter.with_lineage(entry))


def _resize_module(
    name: str, m: LoraModule, rule: RankRule, device: torch.device | None
) -> tuple[LoraModule, ModuleChange]:
    b, a = matrices(m)
    cut = truncate(factored_svd([b], [a], device), rule)
    if cut.rank >= m.rank:
        return m, ModuleChange(name, m.rank, m.rank, 0.0)
    out = rebuild(m, cut.B, cut.A, m.scale, m.A.dtype)
    return out, ModuleChange(name, m.rank, cut.rank, cut.rel_error)
