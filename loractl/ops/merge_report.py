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
VANISH = 0.5  # a type keeping less of a ΔW than this: the update is smaller than its quantization step


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
    def rounding_by_type(self) -> dict[str, dict[str, float]]:
        """Per stored type of a base rewritten in its own types (F16, Q8_0, Q4_K, …): the merged modules on
        it, and the share of their ΔW the stored tensors carry, 1 − `rounding_loss` (median and worst)."""
        if not self.rewritten:
            return {}
        kept: dict[str, list[float]] = {}
        for m in self.modules:
            if m.rounding_loss is not None:
                kept.setdefault(m.stored_type, []).append(1.0 - m.rounding_loss)
        return {
            kind: {"modules": len(xs), "survives_median": round_figure(sorted(xs)[len(xs) // 2]) or 0.0,
                   "survives_worst": round_figure(min(xs)) or 0.0}
            for kind, xs in sorted(kept.items())
        }  # fmt: skip

    @property
    def warnings(self) -> list[str]:
        """The rounding warning, with the way out, when the worst loss passes `ROUNDING_WARN`: per stored
        type for a base rewritten in its own types (why, when most of ΔW vanishes under a quantization step)."""
        if self.rewritten:
            return self._type_warnings()
        r = self.rounding
        if r is None or r["worst"] <= ROUNDING_WARN:
            return []
        bad = sum(1 for m in self.modules if (m.rounding_loss or 0.0) > ROUNDING_WARN)
        into = (self.plan.dtype or "the base's dtype").lower()  # type: ignore[union-attr]
        way_out = "merge with --dtype float32 to keep the whole update"
        return [
            f"rounding into {into} removes more than {ROUNDING_WARN:.0%} of ΔW in {bad} module(s) "
            f"(worst {r['worst']:.1%}); {way_out}"
        ]

    def _type_warnings(self) -> list[str]:
        out = []
        for kind, kept in self.rounding_by_type.items():
            if 1.0 - kept["survives_worst"] <= ROUNDING_WARN:
                continue
            line = (f"rounding into {kind}: {kept['survives_worst']:.0%} of a module's ΔW survives at worst "
                    f"({kept['survives_median']:.0%} median)")  # fmt: skip
            if kept["survives_worst"] < VANISH:
                m = max((m for m in self.modules if m.stored_type == kind and m.rounding_loss is not None),
                        key=lambda m: m.rounding_loss or 0.0)  # fmt: skip
                if m.relative_delta and m.rounding_error:
                    line += (f"; {m.module}'s ΔW is {m.relative_delta:.2%} of ‖W‖, smaller than a {kind} step "
                             f"(requantizing moves W by {m.rounding_error * m.relative_delta:.2%} of ‖W‖), so it "
                             "mostly vanishes")  # fmt: skip
            out.append(f"{line}; {self._way_out()}")
        return out

    def _way_out(self) -> str:
        """How to keep the whole update, for the kind of base this merge rewrote."""
        kind: str = getattr(self.plan, "kind", "")  # a PlacedPlan's `Base.kind`
        if kind.startswith("gguf"):
            return ("merge into an F16/F32 GGUF (convert_hf_to_gguf.py --outtype f16), or the Hugging Face checkpoint "
                    "with --dtype float16, or apply the adapter at run time")  # fmt: skip
        if kind.startswith("bitsandbytes"):
            return "merge without --keep-quant (written dequantized), or apply the adapter at run time"
        if kind.startswith("fp8"):
            return "merge with --dtype bfloat16 (written dequantized), or apply the adapter at run time"
        return "merge into a wider base (F16/F32) or apply the adapter at run time"

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
            "rounding_by_type": self.rounding_by_type,
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
