"""What both merge pipelines share: progress, the base fingerprint check, ΔW's stored shape.

A Hugging Face checkpoint streams through `merge_plan` → `merge`; a base rewritten in its own
types (GGUF, single-file SD) through `merge_placed_plan` → `merge_placed`. Both report progress and check
base fingerprints the same way, from here, and both return a `merge_report.MergeReport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IntegrityError
from ..io.checkpoint import PER_TENSOR, same_base, scheme_of

if TYPE_CHECKING:
    from ..bases.protocol import Base
    from ..info import AdapterInfo, ModuleInfo


@dataclass(frozen=True)
class MergeProgress:
    """Where a running merge is, after each written tensor."""

    tensor: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


def recorded_fingerprint(info: AdapterInfo) -> str | None:
    return info.record.base_fingerprint if info.record else None


def record_scheme(info: AdapterInfo) -> str:
    """How a merge takes the adapter's base fingerprint for its record: as the adapter's own record was taken (the
    two are compared), else `PER_TENSOR` (hashed in the order the base stores its tensors, beside the merge's own
    reads of them: `io.checkpoint.fingerprint_of`)."""
    recorded = recorded_fingerprint(info)
    return scheme_of(recorded) if recorded else PER_TENSOR


def check_base_fingerprints(
    base: Base, adapters: Sequence[tuple[Path, AdapterInfo]], fingerprints: Sequence[str | None], allow_mismatch: bool
) -> tuple[str, ...]:
    """Before a byte is written: each adapter's recorded base against this base (in any floating dtype),
    whatever the kind of base. Returns the notes for the report; raises `IntegrityError` on a mismatch."""
    notes = []
    for (path, info), actual in zip(adapters, fingerprints, strict=True):
        recorded = recorded_fingerprint(info)
        if info.record is None or not recorded or recorded == actual:
            continue
        if actual is not None:  # a remembered fingerprint is confirmed before it refuses anything
            actual = base.fingerprint(list(info.modules), fresh=True, scheme=scheme_of(recorded))
            if recorded == actual:
                continue
        if actual is None:
            notes.append(f"{path}: its recorded base cannot be checked against quantized tensors")
        elif same_base(recorded, info.record.base_views, actual, partial(base.fingerprint_views, list(info.modules))):
            notes.append(f"{path}: this base holds the adapter's base weights in another floating dtype")
        elif allow_mismatch:
            notes.append(f"{path}: made for another base (fingerprint {recorded[:19]}…), merged anyway")
        else:
            raise IntegrityError(
                f"the adapter was made for another base (its base fingerprint {recorded[:19]}…, "
                f"this base {actual[:19]}…); nothing was written",
                path=path,
                hint="merge it into the base it was trained or extracted on "
                "(--allow-base-mismatch merges anyway if you know they match)",
            )
    return tuple(notes)


def stored_shape(m: ModuleInfo) -> tuple[int, ...]:
    """The shape the base stores the module's weight in (see `loractl.adapter` for the layouts)."""
    if m.kind == "conv":
        return (m.out_features, m.in_features, *m.kernel)
    if m.kind == "embedding" or m.fan_in_fan_out:
        return (m.in_features, m.out_features)
    return (m.out_features, m.in_features)
