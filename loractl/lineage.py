"""Provenance stored in the safetensors `__metadata__` as one JSON string.

PEFT and safetensors ignore metadata keys they do not know, so a PEFT-format file that
carries loractl's record stays loadable by PEFT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .errors import FormatError
from .io.values import finite_number

METADATA_KEY = "loractl"
RECORD_VERSION = 1


@dataclass(frozen=True)
class Record:
    """What loractl writes next to the tensors: identity, history, exact scales."""

    content_hash: str | None = None
    lineage: tuple[dict[str, Any], ...] = ()
    base_model: str | None = None
    base_revision: str | None = None
    base_fingerprint: str | None = None
    base_views: dict[str, str] = field(default_factory=dict)  # the base's fingerprint as bf16/fp16 (`FingerprintViews`)
    scales: dict[str, float] = field(default_factory=dict)  # exact scales the config's alphas cannot express
    # Per-module facts a PEFT config holds only once for all modules:
    fan_in_fan_out: dict[str, bool] = field(default_factory=dict)  # orientation where it differs from the config's
    padded_bias: tuple[str, ...] = ()  # modules whose lora_B.bias is zero padding (PEFT wants every module or none)


def new_entry(
    op: str, params: dict[str, Any], parents: list[str], metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One lineage step: operation, parameters, parents' content hashes, time, loractl version."""
    entry: dict[str, Any] = {
        "op": op,
        "params": params,
        "parents": parents,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loractl_version": __version__,
    }
    if metrics:
        entry["metrics"] = metrics
    return entry


def encode(record: Record) -> str:
    """The metadata value: compact, key-sorted JSON (deterministic bytes)."""
    doc: dict[str, Any] = {
        "version": RECORD_VERSION,
        "content_hash": record.content_hash,
        "lineage": list(record.lineage),
    }
    base = {"model": record.base_model, "revision": record.base_revision, "fingerprint": record.base_fingerprint}
    if any(base.values()):
        doc["base"] = {k: v for k, v in base.items() if v}
    if record.base_views:
        doc.setdefault("base", {})["views"] = record.base_views
    if record.scales:
        doc["scales"] = record.scales
    if record.fan_in_fan_out:
        doc["fan_in_fan_out"] = record.fan_in_fan_out
    if record.padded_bias:
        doc["padded_bias"] = sorted(record.padded_bias)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def decode(metadata: dict[str, str]) -> Record | None:
    """The record in a header's metadata, or None when loractl did not write the file (or it is mangled).

    Mangled includes any field of the wrong type (the file may come from anyone): callers get a
    record whose types are the ones declared, or none.
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        base = doc.get("base") or {}
        return Record(
            content_hash=_text(doc.get("content_hash")),
            lineage=tuple(e for e in doc.get("lineage", []) if isinstance(e, dict)),
            base_model=_text(base.get("model")),
            base_revision=_text(base.get("revision")),
            base_fingerprint=_text(base.get("fingerprint")),
            base_views={str(k): str(v) for k, v in (base.get("views") or {}).items()},
            scales={str(k): finite_number(v, "scale") for k, v in (doc.get("scales") or {}).items()},
            fan_in_fan_out={str(k): bool(v) for k, v in (doc.get("fan_in_fan_out") or {}).items()},
            padded_bias=tuple(str(m) for m in doc.get("padded_bias") or ()),
        )
    except (ValueError, TypeError, AttributeError, RecursionError, FormatError):
        return None


def _text(value: Any) -> str | None:
    """A string field of the record (None when absent); any other type makes the record mangled."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
