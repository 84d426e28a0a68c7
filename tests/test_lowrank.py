"""Factored low-rank numerics against dense float64 references, and the kohya rank rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loractl.adapter import LoraModule
from loractl.errors import UsageError
from loractl.ops.linalg import factored_frobenius
from loractl.ops.lowrank import (
    RankRule,
    choose_rank,
    factored_svd,
    matrices,
    rebuild,
    to_factor_layout,
    truncate,
    truncate_dense,
)


def _factors(seed: int, out: int, inp: int, ranks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(out, r, generator=g, dtype=torch.float64) for r in ranks]
    as_ = [torch.randn(r, inp, generator=g, dtype=torch.float64) for r in ranks]
    return bs, as_


shapes = st.tuples(
    st.integers(0, 2**16),
    st.integers(1, 24),
    st.integers(1, 24),
    st.lists(st.integers(1, 6), min_size=1, max_size=3),
)


@given(shapes)
def test_factored_svd_is_the_dense_svd(case: tuple[int, int, int, list[int]]) -> None:
    bs, as_ = _factors(*case)
    dense = sum(b @ a for b, a in zip(bs, as_, strict=True))
    svd = factored_svd(bs, as_)
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, dense, atol=1e-10 * float(dense.abs().max()))
    reference = torch.linalg.svdvals(dense)[: len(svd.S)]
    assert torch.allclose(svd.S, reference, atol=1e-10 * float(reference[0]))
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(len(svd.S), dtype=torch.float64), atol=1e-10)


@given(shapes, st.integers(1, 8))
def test_truncation_error_is_the_optimum(case: tuple[int, int, int, list[int]], rank: int) -> None:
    bs, as_ = _factors(*case)
    dense = sum(b @ a for b, a in zip(bs, as_, strict=True))
    cut = truncate(factored_svd(bs, as_), RankRule(rank=rank))
    s = torch.linalg.svdvals(dense)
    optimal = math.sqrt(float((s[cut.rank :] ** 2).sum() / (s**2).sum()))
    achieved = float(torch.linalg.matrix_norm(dense - cut.B @ cut.A) / torch.linalg.matrix_norm(dense))
    assert cut.rank == min(rank, len(s), sum(case[3]))
    assert cut.rel_error == pytest.approx(optimal, abs=1e-9)
    assert achieved == pytest.approx(optimal, abs=1e-9)


def _kohya_rank(s: torch.Tensor, method: str, target: float) -> int:
    """kohya resize_lora.py's index functions (+1), the reference for the dynamic rules."""
    if method == "sv_fro":
        cum = torch.cumsum(s**2, 0) / float((s**2).sum())
        index = int(torch.searchsorted(cum, target**2))
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / float(s.sum()), target))
    else:
        index = int((s > s[0] / target).sum()) - 1
    return max(0, min(index, len(s) - 1)) + 1


@given(
    st.lists(st.floats(0.01, 100), min_size=1, max_size=20),
    st.floats(0.05, 0.999),
    st.floats(1.01, 50),
)
def test_dynamic_rules_match_kohya(values: list[float], fraction: float, ratio: float) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    assert choose_rank(s, RankRule(energy=fraction**2)) == _kohya_rank(s, "sv_fro", fraction)
    assert choose_rank(s, RankRule(cumulative=fraction)) == _kohya_rank(s, "sv_cumulative", fraction)
    assert choose_rank(s, RankRule(ratio=ratio)) == _kohya_rank(s, "sv_ratio", ratio)
    assert choose_rank(s, RankRule(energy=fraction, max_rank=2)) <= 2


def test_zero_matrix_keeps_rank_one() -> None:
    assert choose_rank(torch.zeros(5, dtype=torch.float64), RankRule(energy=0.9)) == 1
    cut = truncate(factored_svd([torch.zeros(4, 2)], [torch.zeros(2, 3)]), RankRule(rank=2))
    assert cut.rel_error == 0.0 and torch.count_nonzero(cut.B @ cut.A) == 0


@pytest.mark.parametrize(
    "rule",
    [RankRule(), RankRule(rank=0), RankRule(rank=2, energy=0.5), RankRule(energy=1.5), RankRule(ratio=0.5),
     RankRule(cumulative=0.0), RankRule(energy=0.9, max_rank=0)],
)  # fmt: skip
def test_bad_rules_are_usage_errors(rule: RankRule) -> None:
    with pytest.raises(UsageError):
        rule.check()


@pytest.mark.parametrize("rule", [RankRule(rank=3), RankRule(energy=0.9), RankRule(ratio=4.0)])
def test_dense_truncation_reaches_the_optimum(rule: RankRule) -> None:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(40, 30, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 30, dtype=torch.float64)
    cut = truncate_dense(dense, rule)
    s = torch.linalg.svdvals(dense)
    assert cut.rank == choose_rank(s, rule)
    optimal = math.sqrt(float((s[cut.rank :] ** 2).sum() / (s**2).sum()))
    assert cut.rel_error == pytest.approx(optimal, rel=1e-4)


def test_frobenius_from_factors() -> None:
    bs, as_ = _factors(1, 30, 20, [5])
    assert factored_frobenius(bs[0], as_[0]) == pytest.approx(
        float(torch.linalg.matrix_norm(bs[0] @ as_[0])), rel=1e-12
    )


@pytest.mark.parametrize(
    ("kind", "a_shape", "b_shape", "fan_in_fan_out"),
    [("linear", (3, 7), (5, 3), False), ("linear", (3, 7), (5, 3), True), ("embedding", (3, 11), (6, 3), False),
     ("conv", (3, 4, 3, 3), (5, 3, 1, 1), False)],
)  # fmt: skip
def test_factor_layout_round_trip(
    kind: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], fan_in_fan_out: bool
) -> None:
    g = torch.Generator().manual_seed(2)
    m = LoraModule(A=torch.randn(a_shape, generator=g), B=torch.randn(b_shape, generator=g), scale=0.5,
                   alpha=1.5, kind=kind, fan_in_fan_out=fan_in_fan_out)  # type: ignore[arg-type]  # fmt: skip
    b, a = matrices(m)
    assert torch.allclose(to_factor_layout(m.delta_weight(), m).double(), 0.5 * b @ a, atol=1e-5)
    back = rebuild(m, b, a, m.scale, m.A.dtype)
    assert torch.equal(back.A, m.A) and torch.equal(back.B, m.B) and back.alpha == pytest.approx(1.5)
