"""Exact low-rank numerics on factors: the SVD of Σ Bᵢ Aᵢ without forming the (out, in) matrix.

A sum of low-rank products is B_cat A_cat with B_cat = [B₁ … Bₙ] (out, R) and A_cat the
stacked Aᵢ (R, in), R = Σ rᵢ. With QR(B_cat) = Q_b R_b and QR(A_catᵀ) = Q_a R_a,
B_cat A_cat = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the small (R, R) core gives the exact thin SVD
of the sum in O((out + in) R²) instead of O(out · in · min(out, in)). Everything here runs in
float64 (cheap at these sizes) and reports errors from the singular values, also in float64:
float32 reductions over millions of elements are visibly inaccurate on CPU (PERF.md, pitfalls).

The module layout helpers map a `LoraModule`'s tensors to plain matrices ("factor space",
B (out, r) @ A (r, in_flat)) and back, so conv kernels, embeddings and Conv1D bases all
share one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..adapter import LoraModule
from ..errors import UsageError
from . import linalg


class SVD(NamedTuple):
    """A thin SVD in float64: U (out, k), S (k,) descending, Vh (k, in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: a fixed rank, or a dynamic rule capped by `max_rank`.

    `energy` keeps the smallest k with Σᵢ≤ₖ σᵢ² ≥ energy · Σ σ² (kohya's sv_fro F is energy F²);
    `ratio` keeps σᵢ > σ₁ / ratio (kohya's sv_ratio); `cumulative` keeps the smallest k with
    Σᵢ≤ₖ σᵢ ≥ cumulative · Σ σ (kohya's sv_cumulative).
    """

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    cumulative: float | None = None
    max_rank: int | None = None

    def check(self) -> None:
        """Raise `UsageError` unless exactly one rule is given with a sensible value."""
        given = [n for n in ("rank", "energy", "ratio", "cumulative") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UsageError(
                f"give exactly one of rank, energy, ratio, cumulative (got {', '.join(given) or 'none'})",
                hint="e.g. --rank 16, or --energy 0.99 with an optional --max-rank",
            )
        for name in ("rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(
                    f"{name.replace('_', '-')} must be at least 1, got {value}", hint="a LoRA needs rank ≥ 1"
                )
        for name in ("energy", "cumulative"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"{name} must be in (0, 1], got {value}", hint="e.g. 0.99 keeps 99%")
        if self.ratio is not None and not self.ratio >= 1:
            raise UsageError(f"ratio must be at least 1, got {self.ratio}", hint="keeps σ > σ_max / ratio; e.g. 4")

    def params(self) -> dict[str, float | int]:
        """The rule as lineage parameters."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class LowRankFit:
    """ΔW ≈ B @ A (float64) and the relative error ‖ΔW − B A‖_F / ‖ΔW‖_F of dropping the rest."""

    B: torch.Tensor  # (out, k), U·√S
    A: torch.Tensor  # (k, in), √S·Vh
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def factored_core(
    Bs: list[torch.Tensor], As: list[torch.Tensor], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_bᵀ (m, out), core (m, n), Q_aᵀ (n, in)) with Σ Bᵢ Aᵢ = Q_b · core · Q_aᵀ, all float64, on `device`.

    ‖Σ Bᵢ Aᵢ‖_F = ‖core‖_F without the cancellation a Gram-matrix expansion suffers when the
    terms nearly cancel (a difference of two close versions).
    """
    b = torch.cat([x.double() for x in Bs], dim=1).to(device or "cpu")
    a = torch.cat([x.double() for x in As], dim=0).to(device or "cpu")
    qb_t, rb = linalg.tall_qr_t(b)  # Qᵀ (m, out), R (m, R), m = min(out, R)
    qa_t, ra = linalg.tall_qr_t(a.T)  # (n, in), (n, R)
    return qb_t, rb @ ra.T, qa_t


def factored_distance(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B₁A₁ − B₂A₂‖_F from the factors, in float64: exactly 0 when the factors are equal.

    Otherwise ‖core‖_F of the stacked factors (`factored_core`), which does not cancel as a Gram
    expansion would: that left √(float64 eps) ≈ 1e-8 between a module and its bit-identical copy.
    """
    same = b1.shape == b2.shape and a1.shape == a2.shape
    if same and bool(torch.equal(b1.double(), b2.double())) and bool(torch.equal(a1.double(), a2.double())):
        return 0.0
    return float(torch.linalg.matrix_norm(factored_core([b1, -b2], [a1, a2])[1]))


def factored_svd(Bs: list[torch.Tensor], As: list[torch.Tensor], device: torch.device | None = None) -> SVD:
    """The exact thin SVD of Σ Bᵢ Aᵢ from the factors, Bᵢ (out, rᵢ) and Aᵢ (rᵢ, in); k = min(R, out, in).

    Computed on `device` (float64: see `ops.devices.float64_device`), returned on the CPU.
    """
    qb_t, core, qa_t = factored_core(Bs, As, device)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return SVD((u.T @ qb_t).T.cpu(), s.cpu(), (vh @ qa_t).cpu())


def choose_rank(s: torch.Tensor, rule: RankRule) -> int:
    """The rank `rule` keeps from descending singular values `s`: at least 1, at most len(s) and max_rank."""
    s = s.double()
    if rule.rank is not None:
        k = rule.rank
    elif float(s[0]) <= 0:
        k = 1  # a zero ΔW: keep the smallest representable adapter
    elif rule.energy is not None:
        k = _first_reaching(torch.cumsum(s**2, 0), rule.energy)
    elif rule.cumulative is not None:
        k = _first_reaching(torch.cumsum(s, 0), rule.cumulative)
    else:
        assert rule.ratio is not None
        k = int((s > s[0] / rule.ratio).sum())
    cap = min(len(s), rule.max_rank or len(s))
    return max(1, min(k, cap))


def truncate(svd: SVD, rule: RankRule) -> LowRankFit:
    """Keep the leading singular triplets `rule` asks for, split as B = U√S, A = √S Vh."""
    k = choose_rank(svd.S, rule)
    root = svd.S[:k].sqrt()
    s2 = svd.S**2
    total = float(s2.sum())
    error = math.sqrt(max(float(s2[k:].sum()), 0.0) / total) if total > 0 else 0.0
    return LowRankFit(B=svd.U[:, :k] * root, A=root[:, None] * svd.Vh[:k], rel_error=error)


def truncate_dense(delta: torch.Tensor, rule: RankRule, device: torch.device | None = None) -> LowRankFit:
    """Truncate a dense (out, in) matrix (TIES/DARE results): randomized for a fixed rank or energy
    (`linalg`, within 0.1% of the optimal error), the exact spectrum for ratio and cumulative rules.
    The error is measured against `delta` itself, in float64."""
    m = delta.float().to(device or "cpu")
    total = linalg.frobenius_sq(m)
    if rule.rank is not None:
        t = linalg.truncated_svd(m, min(rule.rank, *m.shape))
    elif rule.energy is not None:
        t = linalg.svd_by_energy(m, rule.energy, rule.max_rank, total=total)
    else:
        full = linalg.truncated_svd(m, min(m.shape), method="exact")
        t = full.head(choose_rank(full.S, rule))
    b, a = linalg.balanced_factors(t)
    error = linalg.relative(linalg.residual_sq(m, b, a), total)
    return LowRankFit(B=b.cpu().double(), A=a.cpu().double(), rel_error=error)


def _first_reaching(cumulative: torch.Tensor, fraction: float) -> int:
    """The smallest k whose cumulative sum reaches `fraction` of the total (tolerant of float64 rounding)."""
    target = fraction * float(cumulative[-1]) * (1 - 1e-12)
    return int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype))[0]) + 1


# --- LoraModule ↔ factor space -------------------------------------------------------------------


def matrices(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r) and A (r, in_flat) as float64 matrices, without the scale."""
    return m.B.double().flatten(1), m.A.double().flatten(1)


def to_factor_layout(delta: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """A ΔW in the base weight's layout (as `delta_weight` gives it) back as the (out, in_flat) matrix B @ A."""
    if m.kind == "embedding" or m.fan_in_fan_out:
        delta = delta.T
    return delta.flatten(1)


def rebuild(like: LoraModule, B: torch.Tensor, A: torch.Tensor, scale: float, dtype: torch.dtype) -> LoraModule:
    """A module shaped like `like` from factor-space B (out, k) and A (k, in_flat), cast to `dtype`."""
    k = int(A.shape[0])
    a = A.reshape(k, *like.A.shape[1:]).to(dtype).contiguous()
    b = B.reshape(like.B.shape[0], k, *like.B.shape[2:]).to(dtype).contiguous()
    return replace(like, A=a, B=b, scale=scale, alpha=alpha_for(scale, k, like.scale_rule))


def alpha_for(scale: float, rank: int, rule: str) -> float | None:
    """The alpha that writes `scale` at `rank` under `rule` (None where the rule has no alpha)."""
    if rule == "alpha/r":
        return scale * rank
    if rule == "alpha/sqrt(r)":
        return scale * math.sqrt(rank)
    return None


def common_dtype(modules: list[LoraModule]) -> torch.dtype:
    """The inputs' factor dtype when they agree, float32 otherwise."""
    dtypes = {t.dtype for m in modules for t in (m.A, m.B)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
