"""Rank allocation under a global parameter budget: the ranks that lose the least ‖ΔW‖²_F in total.

Keeping rank k of an m × n module costs k·(m + n) parameters and keeps σ₁² + … + σ_k² of its
‖ΔW‖²_F (Eckart–Young), so the problem is a knapsack with one concave gain curve per module.
Greedy by σ²/(m + n) is not optimal at a given budget (a cheap module's steps can crowd out one
expensive step worth far more), so `allocate` solves it exactly:

- modules of the same cost m + n form one class; the best k ranks within a class are the k
  largest σ² of the class's spectra together (each module's σ² descend, so they form prefixes);
- a dynamic program over the classes (few: one per distinct module shape), with the budget in
  units of the gcd of the costs, picks how many ranks each class gets; the last class is only
  evaluated at the full budget, so two classes (a Llama: attention and MLP) cost O(units + ranks).

Every module keeps rank ≥ 1 (a rank-0 module is not an adapter module), so the budget must cover
rank 1 everywhere. Sums of squares are float64 (PERF.md, pitfalls).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..errors import UsageError
from ..io.checkpoint_writer import parse_size


@dataclass(frozen=True)
class Allocation:
    """Chosen ranks, what they cost and lose, and the uniform-rank choice of at most the same size.

    Attributes:
        ranks: the rank per module.
        params: Σ rank·(m + n) over modules (≤ the budget).
        error_sq: Σ over modules of ‖ΔW − ΔW_k‖²_F at the chosen ranks.
        total_sq: Σ ‖ΔW‖²_F.
        uniform_rank: the largest single rank (capped per module) that fits the budget.
        uniform_params, uniform_error_sq: its size and its summed squared error.
    """

    budget: int
    ranks: dict[str, int]
    params: int
    error_sq: float
    total_sq: float
    uniform_rank: int
    uniform_params: int
    uniform_error_sq: float

    @property
    def rel_error(self) -> float:
        """√(Σ error² / Σ ‖ΔW‖²): the whole adapter's relative Frobenius error."""
        return math.sqrt(self.error_sq / self.total_sq) if self.total_sq > 0 else 0.0

    @property
    def uniform_rel_error(self) -> float:
        return math.sqrt(self.uniform_error_sq / self.total_sq) if self.total_sq > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary (the per-module ranks are in the op's module report)."""
        return {
            "budget": self.budget,
            "params": self.params,
            "rel_error": self.rel_error,
            "uniform": {"rank": self.uniform_rank, "params": self.uniform_params, "rel_error": self.uniform_rel_error},
        }


def parse_budget(text: str | int, itemsize: int) -> int:
    """A budget in parameters: a plain integer is a parameter count, a size ('50MB', '2GiB') is bytes / itemsize."""
    if isinstance(text, int):
        count = text
    elif text.strip().replace("_", "").isdigit():
        count = int(text.strip().replace("_", ""))
    else:
        count = parse_size(text) // itemsize
    if count < 1:
        raise UsageError(f"--budget {text} must be at least one parameter", hint="e.g. --budget 2000000 or 8MB")
    return count


def allocate(
    spectra: Mapping[str, Sequence[float]], totals: Mapping[str, float], costs: Mapping[str, int], budget: int
) -> Allocation:
    """The ranks minimising Σ ‖ΔW − ΔW_k‖²_F with Σ k·cost ≤ `budget` and 1 ≤ k ≤ len(spectrum).

    Args:
        spectra: per module, σ² in descending order, as far as a rank may go.
        totals: per module, ‖ΔW‖²_F (≥ Σ of its spectrum).
        costs: per module, m + n: the parameters one rank costs.
        budget: parameters available for all factors together.
    """
    floor = sum(costs.values())
    if budget < floor:
        raise UsageError(
            f"--budget {budget} parameters is below {floor}, the size of rank 1 in all {len(costs)} modules",
            hint=f"give at least {floor} parameters (or adapt fewer modules)",
        )
    unit = reduce(math.gcd, costs.values())
    extra = _best_extra(spectra, costs, (budget - floor) // unit, unit)
    ranks = {name: 1 + extra.get(name, 0) for name in spectra}
    uniform = _uniform_rank(spectra, costs, budget)
    uniform_ranks = {name: min(uniform, len(s)) for name, s in spectra.items()}
    return Allocation(
        budget=budget,
        ranks=ranks,
        params=sum(k * costs[n] for n, k in ranks.items()),
        error_sq=_error_sq(spectra, totals, ranks),
        total_sq=float(sum(totals.values())),
        uniform_rank=uniform,
        uniform_params=sum(k * costs[n] for n, k in uniform_ranks.items()),
        uniform_error_sq=_error_sq(spectra, totals, uniform_ranks),
    )


def _best_extra(
    spectra: Mapping[str, Sequence[float]], costs: Mapping[str, int], units: int, unit: int
) -> dict[str, int]:
    """Ranks beyond 1 per module: the exact optimum over cost classes (see the module docstring)."""
    classes: dict[int, list[tuple[float, str]]] = {}
    for name, s in spectra.items():
        classes.setdefault(costs[name] // unit, []).extend((float(v), name) for v in list(s)[1:])
    steps = {c: sorted(items, key=lambda x: -x[0]) for c, items in sorted(classes.items())}
    gains = {c: np.concatenate([[0.0], np.cumsum([g for g, _ in items[: units // c]])]) for c, items in steps.items()}
    *inner, last = gains
    if not inner:  # one shape: as many of the largest σ² as fit, no table needed
        return _take(steps[last], min(units // last, int(np.argmax(gains[last]))))
    best = np.zeros(0)
    choices = []
    for i, cost in enumerate(inner):  # best[u]: the most σ² kept with at most u units on the classes so far
        best, choice = _first_class(gains[cost], cost, units) if i == 0 else _add_class(best, gains[cost], cost)
        choices.append((cost, choice))
    counts = {last: _last_class(best, gains[last], last)}
    left = units - counts[last] * last
    for cost, choice in reversed(choices):
        counts[cost] = int(choice[left])
        left -= counts[cost] * cost
    extra: dict[str, int] = {}
    for cost, items in steps.items():
        for name, k in _take(items, counts[cost]).items():
            extra[name] = extra.get(name, 0) + k
    return extra


def _take(items: Sequence[tuple[float, str]], count: int) -> dict[str, int]:
    """How many of the first `count` steps (largest σ² first) fall to each module."""
    taken: dict[str, int] = {}
    for _, name in items[:count]:
        taken[name] = taken.get(name, 0) + 1
    return taken


def _first_class(gains: np.ndarray, cost: int, units: int) -> tuple[np.ndarray, np.ndarray]:
    """`_add_class` onto nothing: the gains never decrease, so the best k for u units is as many as fit."""
    enough = int(np.argmax(gains))  # the first k reaching the maximum: no rank that keeps nothing
    choice = np.minimum(np.arange(units + 1) // cost, enough)
    return gains[choice], choice


def _add_class(best: np.ndarray, gains: np.ndarray, cost: int) -> tuple[np.ndarray, np.ndarray]:
    """new[u] = max_k best[u − k·cost] + gains[k], and the k that attains it (the smallest on ties)."""
    new, choice = best.copy(), np.zeros(len(best), dtype=np.int64)
    for k in range(1, len(gains)):
        shift = k * cost
        candidate = best[: len(best) - shift] + gains[k]
        better = candidate > new[shift:]
        new[shift:][better] = candidate[better]
        choice[shift:][better] = k
    return new, choice


def _last_class(best: np.ndarray, gains: np.ndarray, cost: int) -> int:
    """The last class needs the optimum at the full budget only: one max over its k (O(K), not O(K·units))."""
    units = len(best) - 1
    k = np.arange(len(gains))
    total = best[units - k * cost] + gains
    return int(np.argmax(total))  # the first maximum: the smallest k on ties


def _uniform_rank(spectra: Mapping[str, Sequence[float]], costs: Mapping[str, int], budget: int) -> int:
    """The largest r with Σ min(r, len(spectrum))·cost ≤ budget (at least 1: the budget covers rank 1)."""
    longest = max(len(s) for s in spectra.values())
    r = 1
    while r < longest and sum(min(r + 1, len(s)) * costs[n] for n, s in spectra.items()) <= budget:
        r += 1
    return r


def _error_sq(spectra: Mapping[str, Sequence[float]], totals: Mapping[str, float], ranks: Mapping[str, int]) -> float:
    """Σ over modules of ‖ΔW‖² − Σ_{i≤k} σᵢ², never below 0 (float64)."""
    return float(sum(max(totals[n] - math.fsum(list(spectra[n])[: ranks[n]]), 0.0) for n in spectra))
