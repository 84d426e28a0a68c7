"""Dense numerics for extraction: truncated SVD of one ΔW, rank by energy, balanced factors.

Why randomized: a full SVD of a 4096×4096 ΔW takes 10–20 s on 2 cores, while a subspace
iteration of 3–8 passes over ΔW lands within 0.8% of the optimal (Eckart–Young) error in
0.1–0.4 s (docs/benchmarks-extract.md). Where the sketch would be as wide as half
the matrix it saves nothing, so those matrices take the exact thin SVD instead.

Reported figures (norms, errors, energies) are accumulated in float64 over rows: a float32
reduction over tens of millions of elements is off by up to 0.6%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .devices import float64_device

Method = Literal["auto", "exact", "randomized"]

MIN_OVERSAMPLE = 32  # extra sketch columns; below ~100 columns a pass costs about the same whatever the width
MIN_PASSES = 3  # passes over ΔW (each half a power iteration): the first convergence check compares passes 2 and 3
MAX_PASSES = 18
PASS_TOL = 0.005  # stop once a pass adds less than this fraction of the remaining error² to the kept energy
CHOLESKY_MIN_RATIO = 1e-6  # smallest/largest Cholesky pivot: about 1/cond(X); below it, Householder QR
EXACT_MAX_DIM = 256  # at or below this min(d, k) an exact thin SVD is cheap anyway
ENERGY_TOL = 1e-6  # energy 1.0 means "numerically exact", not "every rounding-error direction"
FIRST_GUESS = 32  # first sketch rank when choosing the rank by energy; doubled until enough
ROW_BLOCK = 1024  # rows per block in float64 reductions (bounds the extra memory)
SEED = 0  # fixed sketch seed: the same input gives the same bytes


@dataclass(frozen=True)
class Truncation:
    """A truncated SVD M ≈ U · diag(S) · Vh, with S descending.

    Attributes:
        U: (d, r) orthonormal columns.
        S: (r,) singular values, float32.
        Vh: (r, k) orthonormal rows.
        method: which algorithm produced it.
        passes: passes over the matrix the randomized method made (each a half power iteration).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    method: Literal["exact", "randomized"]
    passes: int = 0

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def head(self, rank: int) -> Truncation:
        """The leading `rank` triplets."""
        return Truncation(self.U[:, :rank], self.S[:rank], self.Vh[:rank], self.method, self.passes)

    def energy(self) -> float:
        """Σ S² in float64: the part of ‖M‖²_F this truncation keeps."""
        return float(self.S.cpu().double().square().sum())


def frobenius_sq(m: torch.Tensor) -> float:
    """‖m‖²_F: row norms in float32, their squares summed in float64, one row block at a time."""
    flat = m.reshape(m.shape[0], -1) if m.ndim > 1 else m.reshape(1, -1)
    return sum(_rows_sq(flat[i : i + ROW_BLOCK]) for i in range(0, flat.shape[0], ROW_BLOCK))


def factored_frobenius(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F from the factors, B (out, r) and A (r, in), never forming the product.

    ‖B·A‖²_F = Σ (BᵀB ⊙ AAᵀ), two r×r Gram matrices in float64; rounding can leave the sum
    a hair below 0 when B·A is (nearly) zero, hence the clamp.
    """
    b, a = B.double(), A.double()
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def _rows_sq(block: torch.Tensor) -> float:
    """Σ of squared row norms: each row (≤ ~10⁴ elements) is exact to ~1e-7 in float32, the sum is float64.

    50× faster than upcasting the block to float64, and as accurate for the figures reported.
    """
    return float(torch.linalg.vector_norm(block, dim=1, dtype=torch.float32).cpu().double().square().sum())


def oversample_for(rank: int) -> int:
    """Extra sketch columns for `rank`: max(32, rank/2).

    Each extra column speeds up convergence per pass; at rank 16 a 48-column pass costs about
    what a 26-column one does (the product is bound by reading ΔW), and saves a pass. At rank 64,
    128 columns saved a pass over 96 but cost ~1.3× per pass: no gain (docs/benchmarks-extract.md).
    """
    return max(MIN_OVERSAMPLE, rank // 2)


def use_exact(shape: tuple[int, int], rank: int) -> bool:
    """Whether the exact thin SVD is the cheaper (or the only sensible) choice for this matrix and rank."""
    small = min(shape)
    return small <= EXACT_MAX_DIM or 2 * (rank + oversample_for(rank)) >= small


def truncated_svd(
    m: torch.Tensor,
    rank: int,
    *,
    method: Method = "auto",
    oversample: int | None = None,
    seed: int = SEED,
    total: float | None = None,
) -> Truncation:
    """The best rank-`rank` approximation of the 2-D float32 matrix `m` (d, k).

    `auto` picks the randomized range finder unless `use_exact` says the thin SVD is as cheap;
    `oversample` defaults to `oversample_for(rank)`; `total` is ‖m‖²_F if the caller has it.
    """
    if not 1 <= rank <= min(m.shape):
        raise ValueError(f"rank {rank} outside 1..{min(m.shape)} for a {tuple(m.shape)} matrix")
    if method == "exact" or (method == "auto" and use_exact((m.shape[0], m.shape[1]), rank)):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return Truncation(u, s, vh, "exact").head(rank)
    width = oversample_for(rank) if oversample is None else oversample
    return _randomized(m, rank, width, seed, frobenius_sq(m) if total is None else total)


def _randomized(
    m: torch.Tensor, rank: int, oversample: int, seed: int, total: float, max_passes: int | None = None
) -> Truncation:
    """Subspace iteration that alternates sides and checks convergence after every pass over M.

    Pass j multiplies M (or Mᵀ) by an orthonormal basis of the other side, so each pass is a
    half power iteration, and each one alone gives a valid approximation: Y = M·P (P the basis,
    orthonormal) is the projection of M onto span(P), and its best rank-r part keeps energy
    `kept`, with error² = ‖M‖² − kept exactly. The loop stops once a pass adds less than
    `PASS_TOL` of the remaining error² (at least `MIN_PASSES`), so a flat spectrum costs 3–4
    passes where whole power iterations cost 6–8; in 171 random cases (shapes 300–900, ranks
    1–64, power-law, gap and Gaussian spectra) the worst error was 1.0078× the optimum. Orthonormalisation is CholeskyQR2 in float64
    (`tall_qr_t`), whose R also yields the singular values: no SVD of a tall matrix.
    """
    width = min(rank + oversample, min(m.shape))
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(m.shape[1], width, generator=g, dtype=m.dtype).to(m.device)  # same sketch anywhere
    exact = float64_device(m.device)
    transposed, passes, kept = False, 0, -math.inf
    max_passes = max_passes or MAX_PASSES
    while True:
        y = (m.T if transposed else m) @ basis  # (other side, width)
        passes += 1
        q_t, r = tall_qr_t(y.to(exact, torch.float64))
        new = float(torch.linalg.svdvals(r)[:rank].square().sum()) if passes > 1 else -math.inf  # P random
        gain, kept = new - kept, new
        done = gain <= PASS_TOL * max(total - kept, 0.0) + ENERGY_TOL * total
        if passes >= max_passes or (passes >= MIN_PASSES and done):
            break
        basis, transposed = q_t.T.to(m.device, m.dtype), not transposed
    # (M or Mᵀ)·P = Q R and R = Uᵣ S Vᵣᴴ give (M or Mᵀ) ≈ (Q Uᵣ) S (P Vᵣ)ᵀ
    u_r, s, vh_r = torch.linalg.svd(r, full_matrices=False)
    left = (u_r.T @ q_t).to(m.device, m.dtype)  # (width, other side)
    right = vh_r.to(m.device, m.dtype) @ basis.T  # (width, basis side)
    u, vh = (right.T, left) if transposed else (left.T, right)
    return Truncation(u.contiguous(), s.to(m.device, torch.float32), vh, "randomized", passes).head(rank)


def tall_qr_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qᵀ and R of the reduced QR of a tall float64 factor x (n, R): CholeskyQR2, else Householder.

    Two passes of Qᵀ ← L⁻¹·Xᵀ, with L the Cholesky factor of XᵀX, cost two Gram products and two
    (R, R)·(R, n) products, several times faster than Householder QR on a 4096 × 64 factor; Q is
    orthonormal to float64 rounding while cond(X) stays below ~1e7 (Yamamoto et al. 2015). Wide,
    rank-deficient or worse-conditioned factors (a zero B, a failed Cholesky) take Householder.
    Qᵀ, not Q, kept contiguous: with MKL, (n, R)·(R, R) float64 products ran 4–10× slower than (R, R)·(R, n).
    """
    if x.shape[0] >= x.shape[1] > 0:
        q_t, r = x.T.contiguous(), torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        for _ in range(2):
            chol, info = torch.linalg.cholesky_ex(q_t @ q_t.T)
            d = chol.diagonal()
            if int(info) or not float(d.min()) > CHOLESKY_MIN_RATIO * float(d.max()):
                break
            eye = torch.eye(len(d), dtype=x.dtype, device=x.device)
            q_t = torch.linalg.solve_triangular(chol, eye, upper=False) @ q_t
            r = chol.T @ r
        else:
            return q_t, r
    qr = torch.linalg.qr(x)
    return qr.Q.T, qr.R


def svd_by_energy(
    m: torch.Tensor, energy: float, max_rank: int | None = None, *, total: float | None = None
) -> Truncation:
    """The smallest-rank truncation keeping at least `energy` of ‖m‖²_F, capped at `max_rank`.

    The sketch starts at rank `FIRST_GUESS` and doubles while the kept energy falls short,
    so the work is at most about twice that of a sketch of the final rank.
    """
    cap = min(max_rank or min(m.shape), min(m.shape))
    total = frobenius_sq(m) if total is None else total
    target = min(energy, 1.0 - ENERGY_TOL) * total
    guess = min(cap, FIRST_GUESS)
    while True:
        if use_exact((m.shape[0], m.shape[1]), guess):
            guess = cap  # the exact SVD yields the whole spectrum at once
        t = truncated_svd(m, guess, total=total)
        kept = torch.cumsum(t.S.cpu().double().square(), 0)
        if kept[-1] >= target or guess == cap:
            reached = int(torch.searchsorted(kept, torch.tensor([target], dtype=torch.float64))[0])
            return t.head(min(reached + 1, guess))
        guess = min(2 * guess, cap)


def balanced_factors(t: Truncation, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (d, r), A (r, k)) with scale · B · A = U · diag(S) · Vh, √(S/scale) in each factor.

    Splitting the singular values evenly keeps both factors at the same magnitude, so
    neither under- nor overflows when cast to half precision.
    """
    root = (t.S / scale).sqrt()
    return t.U * root, root[:, None] * t.Vh


def residual_sq(m: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> float:
    """‖m − scale · b · a‖²_F in float64, one row block at a time (no second d × k matrix)."""
    total = 0.0
    for i in range(0, m.shape[0], ROW_BLOCK):
        total += _rows_sq(m[i : i + ROW_BLOCK] - scale * (b[i : i + ROW_BLOCK] @ a))
    return total


def relative(part_sq: float, whole_sq: float) -> float:
    """√(part / whole), 0 for an empty whole."""
    return math.sqrt(part_sq / whole_sq) if whole_sq > 0 else 0.0
