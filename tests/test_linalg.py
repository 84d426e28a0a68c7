"""The extraction numerics against an independent dense reference (float64 SVD of known spectra)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loractl.ops import linalg


def with_spectrum(d: int, k: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U · diag(s) · Vᵀ with random orthonormal U (d, n), V (k, n): a matrix whose spectrum is s."""
    g = torch.Generator().manual_seed(seed)
    n = s.numel()
    u = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, n, generator=g, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.T).float()


@functools.cache
def known(spectrum: str, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix, spectrum), built once per test session."""
    s = SPECTRA[spectrum](min(d, k))
    return with_spectrum(d, k, s), s


def optimal_error(s: torch.Tensor, rank: int) -> float:
    """Eckart–Young: the best rank-r error is the tail of the spectrum."""
    return math.sqrt(float(s[rank:].double().square().sum()))


def error(m: torch.Tensor, t: linalg.Truncation) -> float:
    b, a = linalg.balanced_factors(t)
    return math.sqrt(linalg.residual_sq(m, b, a))


SPECTRA = {
    "decaying": lambda n: 1.0 / (1.0 + torch.arange(n, dtype=torch.float64)),
    "slow": lambda n: (1.0 + torch.arange(n, dtype=torch.float64)) ** -0.5,
    "flat": lambda n: 1.0 + 0.01 * torch.linspace(1, 0, n, dtype=torch.float64),
    "gap": lambda n: torch.where(torch.arange(n) < 12, 1.0, 1e-3).double(),
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_randomized_within_one_percent_of_optimal(spectrum: str, rank: int) -> None:
    m, s = known(spectrum, 400, 320)
    t = linalg.truncated_svd(m, rank, method="randomized")
    assert t.method == "randomized" and t.rank == rank
    assert error(m, t) <= 1.01 * optimal_error(s, rank) + 1e-6


def test_exact_is_optimal_and_matches_spectrum() -> None:
    s = SPECTRA["decaying"](48)
    m = with_spectrum(64, 48, s)
    t = linalg.truncated_svd(m, 10)
    assert t.method == "exact"
    torch.testing.assert_close(t.S.double(), s[:10], rtol=1e-5, atol=1e-6)
    assert error(m, t) == pytest.approx(optimal_error(s, 10), rel=1e-4)


def test_auto_picks_randomized_only_for_wide_matrices() -> None:
    assert linalg.use_exact((64, 4096), 8)
    assert not linalg.use_exact((4096, 4096), 64)
    assert linalg.use_exact((1024, 1024), 500)


@given(
    d=st.integers(2, 40), k=st.integers(2, 40), r=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 99)
)
def test_rank_r_matrix_is_reproduced(d: int, k: int, r: int, extra: int, seed: int) -> None:
    r = min(r, d, k)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, r, generator=g) @ torch.randn(r, k, generator=g)
    t = linalg.truncated_svd(m, min(r + extra, d, k))
    assert error(m, t) <= 1e-5 * math.sqrt(linalg.frobenius_sq(m))


def test_randomized_reproduces_low_rank_matrix_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    m = torch.randn(600, 5, generator=g) @ torch.randn(5, 500, generator=g)
    t = linalg.truncated_svd(m, 8, method="randomized")
    assert error(m, t) <= 1e-5 * math.sqrt(linalg.frobenius_sq(m))


def test_truncated_svd_refuses_impossible_rank() -> None:
    with pytest.raises(ValueError):
        linalg.truncated_svd(torch.ones(4, 3), 4)
    with pytest.raises(ValueError):
        linalg.truncated_svd(torch.ones(4, 3), 0)


@pytest.mark.parametrize(("shape", "method"), [((64, 48), "exact"), ((400, 320), "randomized")])
def test_energy_picks_the_smallest_sufficient_rank(shape: tuple[int, int], method: str) -> None:
    m, s = known("decaying", *shape)
    kept = torch.cumsum(s.square(), 0) / s.square().sum()
    for energy in (0.5, 0.8, 0.9):
        expected = int((kept < energy).sum()) + 1  # reference: cumulative energy of the known spectrum
        t = linalg.svd_by_energy(m, energy)
        assert t.rank == expected, energy
        assert t.method == method
        assert t.energy() / linalg.frobenius_sq(m) >= energy - 1e-5


def test_energy_respects_max_rank_and_full_energy_is_exact() -> None:
    m, _ = known("slow", 400, 320)
    assert linalg.svd_by_energy(m, 0.99, max_rank=20).rank == 20
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 7, generator=g) @ torch.randn(7, 280, generator=g)
    t = linalg.svd_by_energy(low, 1.0)
    assert t.rank == 7


def test_balanced_factors_split_singular_values_evenly() -> None:
    m = with_spectrum(50, 40, SPECTRA["decaying"](40) * 1e3)
    t = linalg.truncated_svd(m, 6)
    b, a = linalg.balanced_factors(t, scale=2.0)
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=0)
    torch.testing.assert_close(2.0 * b @ a, (t.U * t.S) @ t.Vh, rtol=1e-4, atol=1e-3)


def test_frobenius_is_accumulated_in_float64() -> None:
    m = torch.full((3000, 1000), 0.1, dtype=torch.float32) + torch.linspace(0, 1e-3, 1000)
    reference = float(m.double().square().sum())
    assert linalg.frobenius_sq(m) == pytest.approx(reference, rel=1e-7)
    assert linalg.residual_sq(m, torch.zeros(3000, 1), torch.zeros(1, 1000)) == pytest.approx(reference, rel=1e-7)
    assert linalg.frobenius_sq(m.bfloat16()) == pytest.approx(float(m.bfloat16().double().square().sum()), rel=1e-7)


def test_passes_continue_on_a_flat_spectrum(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Gaussian matrix (Marchenko–Pastur, the hardest case for a sketch) needs more than the minimum passes."""
    m = torch.randn(600, 500, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(m.double())
    adaptive = linalg.truncated_svd(m, 32, method="randomized")
    assert adaptive.passes > linalg.MIN_PASSES
    assert error(m, adaptive) <= 1.01 * optimal_error(s, 32)
    monkeypatch.setattr(linalg, "MAX_PASSES", linalg.MIN_PASSES)
    fixed = linalg.truncated_svd(m, 32, method="randomized")
    assert fixed.passes == linalg.MIN_PASSES and error(m, fixed) > error(m, adaptive)
    decaying, _ = known("decaying", 400, 320)
    assert linalg.truncated_svd(decaying, 8, method="randomized").passes <= linalg.MIN_PASSES + 1


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(300, 520),
    k=st.integers(300, 520),
    rank=st.integers(1, 64),
    decay=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_randomized_error_against_the_float64_optimum(d: int, k: int, rank: int, decay: float, seed: int) -> None:
    """σᵢ ∝ i^-decay plus noise, any shape and rank: within 1.01× the Eckart–Young error of a float64 full SVD.

    decay 0 is flat (every direction equally strong), the hardest case for a sketch; the reference
    is the spectrum of the float32 matrix actually factored, computed in float64.
    """
    g = torch.Generator().manual_seed(seed)
    n = min(d, k)
    s = (1.0 + torch.arange(n, dtype=torch.float64)) ** -decay
    m = with_spectrum(d, k, s, seed) + 1e-3 * torch.randn(d, k, generator=g) / math.sqrt(k)
    t = linalg.truncated_svd(m, rank, method="randomized")
    exact = torch.linalg.svdvals(m.double())
    assert t.rank == rank and t.passes >= linalg.MIN_PASSES
    assert error(m, t) <= 1.01 * optimal_error(exact, rank)
    residual = linalg.frobenius_sq(m) - t.energy()  # error² = ‖M‖² − kept: the projection is orthogonal
    assert error(m, t) ** 2 == pytest.approx(residual, rel=1e-3, abs=1e-6 * linalg.frobenius_sq(m))


@pytest.mark.parametrize("shape", [(2000, 400), (400, 2000)])
def test_factors_are_orthonormal_on_tall_and_wide_matrices(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping after a pass over M or over Mᵀ both give orthonormal U and Vh with the true leading σ."""
    s = SPECTRA["gap"](min(shape))  # 12 σ = 1, then 1e-3: three passes find the leading 10 to float32 rounding
    m = with_spectrum(*shape, s)
    for passes in (3, 4):  # the last pass over M, then over Mᵀ
        monkeypatch.setattr(linalg, "MIN_PASSES", passes)
        t = linalg._randomized(m, 10, 10, 0, linalg.frobenius_sq(m), max_passes=passes)
        assert t.passes == passes
        eye = torch.eye(10)
        torch.testing.assert_close(t.U.T @ t.U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(t.Vh @ t.Vh.T, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(t.S.double(), s[:10], rtol=1e-4, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_factored_frobenius_matches_the_dense_product(seed: int) -> None:
    """‖B·A‖_F from the Gram matrices equals the norm of the formed product (the one home of the formula)."""
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    dense = float(torch.linalg.matrix_norm(b.double() @ a.double()))
    assert linalg.factored_frobenius(b, a) == pytest.approx(dense, rel=1e-12)
    assert linalg.factored_frobenius(torch.zeros(40, 6), a) == 0.0
