"""The merge arithmetic: W' = W + Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ in float32, one block of rows at a time.

Every update is written as a product `factor · left @ right` in the layout the base stores the
weight in, so one loop serves linear, Conv1D (`fan_in_fan_out`), conv and embedding weights:

    linear      left = B (out, r)         right = A (r, in)
    conv        left = B (out, r)         right = A (r, in·k…)     the weight viewed as (out, in·k…)
    Conv1D/emb  left = Aᵀ (in|vocab, r)   right = Bᵀ (r, out|dim)   the stored weight is transposed

A float32 buffer of a few MB holds one block of rows: the weight never exists in float32 as a
whole, and each block is converted, updated in place (`addmm_`) and cast back while it is in cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..adapter import LoraModule
from .linalg import factored_frobenius

BLOCK_ELEMENTS = 1 << 20  # float32 elements per row block (4 MB)
THREADS = 1  # torch intra-op threads while merging; see `kernel_threads`


@dataclass(frozen=True)
class Delta:
    """One update ΔW = factor · left @ right, in the stored layout of the weight it applies to.

    `magnitude` makes it a DoRA update (W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output feature);
    `per_column` says the output features are the stored columns (Conv1D, embeddings).
    """

    left: torch.Tensor  # (rows, rank) float32
    right: torch.Tensor  # (rank, cols) float32
    factor: float
    magnitude: torch.Tensor | None = None  # (out,) float32
    per_column: bool = False


@contextmanager
def kernel_threads() -> Iterator[None]:
    """Run the merge with `THREADS` torch threads, restoring the caller's setting after.

    The work is memory-bound conversions and rank-r updates of a few MB each: extra intra-op
    threads add little, and where other processes share the cores, OpenMP barrier waits make
    them far slower (a 0.6 GB merge on 2 busy cores: 5.7 s with one thread, 17–18 s with two).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def module_delta(module: LoraModule, weight: float) -> Delta:
    """The update `weight · module` applies to its base weight."""
    a, b = module.A.float(), module.B.float()
    transposed = module.kind == "embedding" or module.fan_in_fan_out
    if module.kind == "conv":
        left, right = b.flatten(1), a.flatten(1)
    elif transposed:
        left, right = a.T.contiguous(), b.T.contiguous()
    else:
        left, right = b, a
    magnitude = None if module.magnitude is None else module.magnitude.float().reshape(-1)
    return Delta(left, right, weight * module.scale, magnitude, transposed)


def bias_delta(module: LoraModule, weight: float) -> Delta:
    """lora_B.bias as a rank-1 update of the base bias viewed as (out, 1): b' = b + w·scale·bias."""
    assert module.bias is not None
    return Delta(module.bias.float().reshape(-1, 1), torch.ones(1, 1), weight * module.scale)


def add_deltas_into(out: torch.Tensor, weight: torch.Tensor, deltas: Sequence[Delta]) -> float:
    """Write `weight` + every delta, in order, into `out` (which may be `weight` itself); return ‖weight‖_F.

    DoRA norms are taken of the starting weight plus that adapter's own ΔW, as PEFT's merge does.
    A DoRA update normalising stored columns needs every row at once: then the block is the whole tensor.
    ‖weight‖_F comes from the float32 blocks while they are in cache: float32 norms of single rows
    (exact to float32 rounding; one float32 reduction over a whole weight is off by up to 1%,
    PERF.md) summed in float64.
    """
    rows = weight.shape[0] if weight.ndim else 1
    src, dst = weight.reshape(rows, -1), out.view(rows, -1)
    cols = src.shape[1]
    dora = [d for d in deltas if d.magnitude is not None]
    block = rows if any(d.per_column for d in dora) else max(1, min(rows, BLOCK_ELEMENTS // max(cols, 1)))
    buf = torch.empty(block, cols, dtype=torch.float32)
    start_buf = torch.empty_like(buf) if dora else None
    squares = 0.0
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        cur = buf[: stop - start]
        cur.copy_(src[start:stop])
        squares += float(torch.linalg.vector_norm(cur, dim=1).double().square().sum())
        first = None if start_buf is None else start_buf[: stop - start].copy_(cur)
        for d in deltas:
            _apply(cur, first, d, start, stop)
        dst[start:stop].copy_(cur)
    return math.sqrt(squares)


def _apply(cur: torch.Tensor, first: torch.Tensor | None, d: Delta, start: int, stop: int) -> None:
    left = d.left[start:stop]
    if d.magnitude is None:
        cur.addmm_(left, d.right, alpha=d.factor)
        return
    assert first is not None
    delta = torch.mm(left, d.right).mul_(d.factor)
    norm = torch.linalg.vector_norm(first + delta, dim=0 if d.per_column else 1)
    factor = d.magnitude / norm if d.per_column else d.magnitude[start:stop] / norm
    cur.add_(delta).mul_(factor.view(1, -1) if d.per_column else factor.view(-1, 1))


def delta_norm(d: Delta) -> float:
    """‖factor · left @ right‖_F without forming the product (see `linalg.factored_frobenius`)."""
    return abs(d.factor) * factored_frobenius(d.left, d.right)


def all_finite(t: torch.Tensor) -> bool:
    """True unless a floating-point tensor holds NaN or ±Inf.

    A sum is finite whenever every element is (it propagates NaN and Inf) and costs one fast pass;
    only a non-finite sum, which an overflow can also cause, is checked element by element.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype not in _NATIVE:  # float8: no isfinite kernel
        return all(bool(torch.isfinite(c.float()).all()) for c in torch.split(t.reshape(-1), BLOCK_ELEMENTS))
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


_NATIVE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
