"""The lineage record every writer stores beside the tensors, built the same way for each format.

It also holds what a format has no field for but loractl must not lose: exact scales, and GPT-2's
Conv1D flag (`fan_in_fan_out`, a layout note: the factors are the same, only a merge transposes ΔW).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import lineage

if TYPE_CHECKING:
    from ..adapter import Adapter


def record_for(adapter: Adapter, scales: dict[str, float]) -> lineage.Record:
    """The metadata record written with the file."""
    return lineage.Record(
        content_hash=adapter.content_hash(),
        lineage=adapter.lineage,
        base_model=adapter.meta.base_model,
        base_revision=adapter.meta.base_revision,
        base_fingerprint=adapter.meta.base_fingerprint,
        base_views=adapter.meta.base_views,
        scales=scales,
        fan_in_fan_out={n: True for n, m in sorted(adapter.modules.items()) if m.fan_in_fan_out},
    )
