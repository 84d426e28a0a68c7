"""What a merge wrote, for every kind of base: one report, one `to_dict()`, one renderer (`cli/merge_cmd`).

A Hugging Face checkpoint is streamed into new shards (`merge`), a GGUF or single-file base rewritten
in its own types (`merge_placed`); both give a `MergeReport` of `MergedModule` rows, so the text and
the `--json` document have the same shape whatever the base.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .merge_placed_plan import PlacedPlan
    from .merge_plan import MergePlan

ROUNDING_WARN = 0.1  # warn when rounding into the output type removes more than this share of a ΔW


@dataclass(frozen=True)
class MergedModule:
    """One adapter module as merged into the tensor `tensor`, stored as `stored_type` (BF16, Q4_0, …).

    `relative_delta` is ‖w·scale·B·A‖_F / ‖W‖_F (None when ‖W‖ = 0); `rounding_loss` the share of
    the tensor's update that storing it removes (0 for float32; None when ΔW = 0; docs/merge.md);
    `rounding_error` ‖stored − (W + ΣΔW)‖_F / ‖ΣΔW‖_F, requantization noise included (measured
    where the base is rewritten in its own types, None otherwise).
    """

    adapter: int
    module: str
    tensor: str
    role: str
    stored_type: str
    weight: float
    scale: float
    rank: int
    relative_delta: float | None
    rounding_loss: float | None = None
    rounding_error: float | None = None


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote; `fingerprints[i]` is the base fingerprint over adapter i's weights (None
    where the base's stored values cannot give it: quantized tensors)."""

    output: Path
    plan: MergePlan | PlacedPlan
    modules: tuple[MergedModule, ...]
    fingerprints: tuple[str | None, ...]
    adapter_hashes: tuple[str, ...]
    tensors_checked: int  # tensors checked free of NaN/Inf as they were written
    tensors_copied: int  # tensors written as the base's own bytes
    shards: tuple[str, ...] = ()  # the checkpoint's shard files (a base rewritten in its own types: none)
    base_notes: tuple[str, ...] = ()  # a base recognised in another dtype, a mismatch allowed, a check not possible

    @property
    def rewritten(self) -> bool:
        """Whether the base was rewritten in its own types (GGUF, single file) rather than resharded."""
        from .merge_placed_plan import PlacedPlan

        return isinstance(self.plan, PlacedPlan)

    @property
    def adapter_paths(self) -> list[str]:
        return [str(a) for a in self.plan.adapter_paths]

    @property
    def rounding(self) -> dict[str, float] | None:
        """Median and worst rounding loss over the merged modules (None when there is none)."""
        return rounding_summary(m.rounding_loss for m in self.modules)

    @property
    def worst_rounding_error(self) -> float | None:
        """The largest `rounding_error` over the merged modules (None when none has one)."""
        return max((m.rounding_error for m in self.modules if m.rounding_error is not None), default=None)

    @property
    def warnings(self) -> list[str]:
        """The rounding warning, with the way out, when the worst loss passes `ROUNDING_WARN`."""
        r = self.rounding
        if r is None or r["worst"] <= ROUNDING_WARN:
            return []
        bad = sum(1 for m in self.modules if (m.rounding_loss or 0.0) > ROUNDING_WARN)
        from .merge_placed_plan import PlacedPlan

        if isinstance(self.plan, PlacedPlan):
            into, way_out = "the stored types", "merge into a wider base (F16/F32) or apply the adapter at run time"
        else:
            into = (self.plan.dtype or "the base's dtype").lower()
            way_out = "merge with --dtype float32 to keep the whole update"
        return [
            f"rounding into {into} removes more than {ROUNDING_WARN:.0%} of ΔW in {bad} module(s) "
            f"(worst {r['worst']:.1%}); {way_out}"
        ]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` document: the plan's summary (not its per-tensor rows), then what was written."""
        plan = {k: v for k, v in self.plan.to_dict().items() if k not in ("tensors", "updates", "problems")}
        return {
            "output": str(self.output),
            **plan,
            "shards": list(self.shards),
            "tensors_checked": self.tensors_checked,
            "tensors_copied": self.tensors_copied,
            "nonfinite": 0,
            "fingerprints": list(self.fingerprints),
            "base_notes": list(self.base_notes),
            "adapter_hashes": list(self.adapter_hashes),
            "rounding_loss": self.rounding,
            "worst_rounding_error": self.worst_rounding_error,
            "warnings": self.warnings,
            "modules": [asdict(m) for m in self.modules],
        }


def rounding_summary(losses: Iterable[float | None]) -> dict[str, float] | None:
    """Median and worst of the modules' rounding losses (None when no module has one)."""
    known = sorted(x for x in losses if x is not None)
    if not known:
        return None
    return {"median": round_figure(known[len(known) // 2]) or 0.0, "worst": round_figure(known[-1]) or 0.0}


def round_figure(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")
