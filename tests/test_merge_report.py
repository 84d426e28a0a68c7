"""The one merge report's rounding warning names a way out that fits the kind of base it rewrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from loractl.ops.merge_placed_plan import PlacedPlan
from loractl.ops.merge_report import MergedModule, MergeReport


def _report(kind: str, stored_type: str, loss: float) -> MergeReport:
    plan = PlacedPlan(base="b", kind=kind, adapters=("a",), weights=(1.0,), updates={}, problems=(), tensors_total=1)
    row = MergedModule(0, "q_proj", "q.weight", "weight", stored_type, 1.0, 2.0, 8, 0.01, loss, 2.0)
    return MergeReport(Path("out"), plan, (row,), (None,), ("h",), tensors_checked=1, tensors_copied=0)


@pytest.mark.parametrize(
    ("kind", "way_out"),
    [("gguf llama", "F16/F32 GGUF"), ("sdxl", "wider base (F16/F32)"),
     ("bitsandbytes nf4", "without --keep-quant"), ("fp8 f8_e4m3", "--dtype bfloat16")],
)  # fmt: skip
def test_the_way_out_fits_the_base(kind: str, way_out: str) -> None:
    (warning,) = _report(kind, "Q4_K", 0.8).warnings
    assert warning.startswith("rounding into Q4_K: 20% of a module's ΔW survives") and way_out in warning
    assert "mostly vanishes" in warning  # 20% survives: the update is under the type's step


def test_no_warning_when_little_is_lost() -> None:
    assert _report("gguf llama", "F16", 0.01).warnings == []
