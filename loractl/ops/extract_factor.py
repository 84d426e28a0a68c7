"""What every extraction shares: its parameters (`ExtractConfig`), its result, and one ΔW matrix factored
into a `LoraModule` with the report of what the cut lost (`extract` for checkpoints, `extract_sd` for
single-file SD pairs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..adapter import Adapter, LoraModule
from ..errors import UsageError
from ..io.dtypes import parse_dtype
from ..io.tensor_bytes import torch_dtype
from . import linalg
from .extract_plan import PlanEntry
from .extract_report import ExtractedModule, ExtractReport

Track = Callable[[Iterable[PlanEntry], int], Iterable[PlanEntry]]
Observe = Callable[[str, torch.Tensor], None]  # (module, ΔW as the (d, k) matrix factored): e.g. to plot spectra


@dataclass(frozen=True)
class ExtractConfig:
    """Every extraction parameter with its default; exactly one of `rank`, `energy` and `budget`.

    Attributes:
        rank: the same rank for every module.
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖²_F (0 < energy ≤ 1).
        budget: total factor parameters; the ranks are chosen together to lose the least (`budget.allocate`).
        max_rank: cap on the energy- or budget-chosen rank (budget default: 4× the uniform rank).
        targets: module patterns to factor (PEFT's suffix-regex rule); default every 2-D or conv
            weight except embeddings and output heads.
        save_full: module patterns whose tensors are stored whole (PEFT's modules_to_save).
        alpha: the adapter's alpha; default alpha = rank, so scale = 1.
        dtype: the factors' dtype (safetensors code or torch name).
    """

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    max_rank: int | None = None
    targets: tuple[str, ...] = ()
    save_full: tuple[str, ...] = ()
    alpha: float | None = None
    dtype: str = "F32"

    def check(self) -> None:
        """Raise `UsageError` on inconsistent parameters."""
        if sum(x is not None for x in (self.rank, self.energy, self.budget)) != 1:
            raise UsageError(
                "give exactly one of --rank, --energy and --budget",
                hint="e.g. --rank 16 for the same rank everywhere, or --energy 0.9 to choose it per module",
            )
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank {self.rank} must be at least 1", hint="e.g. --rank 16, or --energy 0.9")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UsageError(f"--energy {self.energy} must be in (0, 1]", hint="e.g. --energy 0.9 keeps 90% of ‖ΔW‖²")
        if self.max_rank is not None and (self.rank is not None or self.max_rank < 1):
            raise UsageError("--max-rank needs --energy or --budget and must be at least 1")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UsageError(f"--alpha {self.alpha} must be a positive number")
        parse_dtype(self.dtype)

    def params(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets), "save_full": list(self.save_full)}


@dataclass(frozen=True)
class Extraction:
    adapter: Adapter
    report: ExtractReport


def factor(
    m: torch.Tensor,
    entry: PlanEntry,
    config: ExtractConfig,
    delta_sq: float,
    base_sq: float,
    device: torch.device | None = None,
) -> tuple[LoraModule, ExtractedModule]:
    """Factor one ΔW matrix m (d, k) into a LoraModule laid out for `entry.kind`, and report the loss."""
    m = m.to(device or "cpu")
    if config.rank is not None:
        t = linalg.truncated_svd(m, config.rank, total=delta_sq)
    else:
        t = linalg.svd_by_energy(m, config.energy or 1.0, config.max_rank, total=delta_sq)
    b, a, alpha = cut_factors(t, config)
    residual = linalg.residual_sq(m, b.float(), a.float(), alpha / t.rank)
    return build_module(t, (b.cpu(), a.cpu(), alpha), entry, residual, delta_sq, base_sq)


def cut_factors(t: linalg.Truncation, config: ExtractConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (d, r), A (r, k), alpha) in the configured dtype, alpha = rank unless --alpha (scale alpha / rank)."""
    alpha = float(t.rank) if config.alpha is None else config.alpha
    dtype = torch_dtype(parse_dtype(config.dtype))
    b, a = (x.to(dtype) for x in linalg.balanced_factors(t, alpha / t.rank))
    return b, a, alpha


def build_module(
    t: linalg.Truncation,
    factors: tuple[torch.Tensor, torch.Tensor, float],
    entry: PlanEntry,
    residual: float,
    delta_sq: float,
    base_sq: float,
) -> tuple[LoraModule, ExtractedModule]:
    """The LoraModule of `factors` (B, A, alpha) of truncation `t`, laid out for `entry.kind`, and its report."""
    b, a, alpha = factors
    scale = alpha / t.rank
    if entry.kind == "conv":
        b, a = b.reshape(*b.shape, *[1] * (len(entry.shape) - 2)), a.reshape(t.rank, *entry.shape[1:])
    module = LoraModule(
        A=a.contiguous(),
        B=b.contiguous(),
        scale=scale,
        alpha=alpha,
        kind=entry.kind,
        fan_in_fan_out=entry.fan_in_fan_out,
    )
    report = ExtractedModule(
        module=entry.module,
        shape=entry.shape,
        rank=t.rank,
        rel_error=linalg.relative(residual, delta_sq),
        energy=min(t.energy() / delta_sq, 1.0),
        delta_ratio=linalg.relative(delta_sq, base_sq),
        method=t.method,
        delta_sq=delta_sq,
        residual_sq=residual,
    )
    return module, report
