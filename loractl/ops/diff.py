"""Diff two adapters (two versions of one adapter): which modules came and went, and how each ΔW moved.

Per common module, with ΔW_A = s_A B_A A_A and ΔW_B = s_B B_B A_B (never formed):
    change   ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F (`lowrank.factored_distance`): 0 for equal factors, else stable
             when the versions nearly agree (a Gram expansion would cancel)
    cosine   ⟨ΔW_A, ΔW_B⟩_F / (‖ΔW_A‖_F ‖ΔW_B‖_F), ⟨·,·⟩ = Σ (B_Aᵀ B_B) ⊙ (A_A A_Bᵀ): two r × r Grams
    overlap  mean cos² of the principal angles between the column spaces of ΔW_A and ΔW_B:
             ‖U_Aᵀ U_B‖²_F / min(k_A, k_B) with U from the factored SVD (k = numerical rank)
All in float64 on (out, r) and (r, in) matrices: O((out + in) r²) per module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..adapter import Adapter, LoraModule
from ..errors import ShapeMismatchError, UsageError
from .linalg import factored_frobenius
from .lowrank import factored_distance, factored_svd, matrices

RANK_TOL = 1e-9  # singular values below this share of σ₁ are rounding, not directions of ΔW
_SAME_BASE_HINT = "diff compares versions of one adapter for one base; check both with 'loractl inspect'"


@dataclass(frozen=True)
class ModuleDiff:
    """One module present in both adapters; `change` is None when ΔW_A = 0 but ΔW_B is not."""

    module: str
    rank_a: int
    rank_b: int
    alpha_a: float | None
    alpha_b: float | None
    scale_a: float
    scale_b: float
    norm_a: float
    norm_b: float
    change: float | None
    cosine: float
    overlap: float

    @property
    def config_changed(self) -> bool:
        """Rank, alpha or scale differ (the ΔW may still agree)."""
        return (self.rank_a, self.alpha_a, self.scale_a) != (self.rank_b, self.alpha_b, self.scale_b)


@dataclass(frozen=True)
class AdapterDiff:
    """What changed from A to B; `modules` holds the common ones, most changed first."""

    modules: tuple[ModuleDiff, ...]
    added: tuple[str, ...]  # modules only B adapts
    removed: tuple[str, ...]  # modules only A adapts
    full_added: tuple[str, ...] = ()
    full_removed: tuple[str, ...] = ()
    full_changed: tuple[str, ...] = ()
    change: float | None = 0.0  # √(Σ ‖ΔW_A − ΔW_B‖² / Σ ‖ΔW_A‖²) over the common modules

    @property
    def identical(self) -> bool:
        """Same modules and full tensors, and every ΔW equal to float64 rounding."""
        lists = (self.added, self.removed, self.full_added, self.full_removed, self.full_changed)
        return not any(lists) and all(m.change is not None and m.change < 1e-12 for m in self.modules)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready document (the `--json` output)."""
        return {
            "change": self.change,
            "identical": self.identical,
            "added": list(self.added),
            "removed": list(self.removed),
            "config_changed": [m.module for m in self.modules if m.config_changed],
            "full_tensors": {
                "added": list(self.full_added),
                "removed": list(self.full_removed),
                "changed": list(self.full_changed),
            },
            "modules": [asdict(m) for m in self.modules],
        }


def diff(a: Adapter, b: Adapter) -> AdapterDiff:
    """Compare adapter `a` (the reference) with `b`; `ShapeMismatchError` when they fit different bases."""
    common = sorted(set(a.modules) & set(b.modules))
    if not common:
        raise UsageError(
            f"the adapters share no module (A adapts {len(a.modules)}, B adapts {len(b.modules)})",
            hint=_SAME_BASE_HINT,
        )
    rows = [diff_module(name, a.modules[name], b.modules[name]) for name in common]
    num = sum((m.change or 0.0) ** 2 * m.norm_a**2 for m in rows)
    den = sum(m.norm_a**2 for m in rows)
    total = math.sqrt(num / den) if den > 0 else (None if any(m.change is None for m in rows) else 0.0)
    ranked = sorted(rows, key=lambda m: (-(math.inf if m.change is None else m.change), m.module))
    fa, fb = a.full_tensors, b.full_tensors
    return AdapterDiff(
        modules=tuple(ranked),
        added=tuple(sorted(set(b.modules) - set(a.modules))),
        removed=tuple(sorted(set(a.modules) - set(b.modules))),
        full_added=tuple(sorted(set(fb) - set(fa))),
        full_removed=tuple(sorted(set(fa) - set(fb))),
        full_changed=tuple(sorted(k for k in set(fa) & set(fb) if not _same_tensor(fa[k], fb[k]))),
        change=total,
    )


def diff_module(name: str, a: LoraModule, b: LoraModule) -> ModuleDiff:
    """The figures of the module docstring for one pair of modules."""
    (ba, aa), (bb, ab) = _scaled(a), _scaled(b)
    if (ba.shape[0], aa.shape[1], a.kind) != (bb.shape[0], ab.shape[1], b.kind):
        raise ShapeMismatchError(
            f"module {name!r}: ΔW is {_describe(a)} in A but {_describe(b)} in B; the adapters fit different bases",
            hint=_SAME_BASE_HINT,
        )
    norm_a, norm_b = factored_frobenius(ba, aa), factored_frobenius(bb, ab)
    distance = factored_distance(ba, aa, bb, ab)
    inner = float(((ba.T @ bb) * (aa @ ab.T)).sum())
    cosine = inner / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0
    change = distance / norm_a if norm_a > 0 else (0.0 if distance == 0 else None)
    return ModuleDiff(name, a.rank, b.rank, a.alpha, b.alpha, a.scale, b.scale, norm_a, norm_b, change,
                      max(-1.0, min(1.0, cosine)), _overlap(ba, aa, bb, ab))  # fmt: skip


def _scaled(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B (out, r), A (r, in_flat)) in float64: ΔW in factor space."""
    b, a = matrices(m)
    return b * m.scale, a


def _overlap(ba: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> float:
    """Mean cos² of the principal angles between col(ΔW_A) and col(ΔW_B); 0 when either ΔW is zero."""
    ua, ub = _column_space(ba, aa), _column_space(bb, ab)
    k = min(ua.shape[1], ub.shape[1])
    return float(torch.linalg.matrix_norm(ua.T @ ub) ** 2) / k if k else 0.0


def _column_space(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (out, k) of col(B A), k its numerical rank."""
    svd = factored_svd([b], [a])
    if svd.S.numel() == 0 or float(svd.S[0]) == 0.0:
        return svd.U[:, :0]
    rank = int((svd.S / svd.S[0] > RANK_TOL).sum())
    return svd.U[:, :rank]


def _describe(m: LoraModule) -> str:
    return f"{m.out_features}×{m.A.flatten(1).shape[1]} ({m.kind})"


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))
