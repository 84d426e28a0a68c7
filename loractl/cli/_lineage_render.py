"""Lineage steps as one readable line each: what was done, with what, and what it measured.

The record keeps every parameter (defaults included) and every metric; a person wants the
ones that were set and the figures that say how it went. `--json` carries the whole record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._text import relative, short_hash

# Metrics worth a place on the line, per operation, with how to print them.
_METRICS: dict[str, tuple[tuple[str, Callable[[Any], str]], ...]] = {
    "train": (("steps", "{} steps".format), ("train_loss", "train loss {:.4g}".format),
              ("eval_loss", "eval loss {:.4g}".format)),
    "resize": (("max_rel_error", lambda x: f"max rel. error {relative(x)}"),),
    "combine": (("max_rel_error", lambda x: f"max rel. error {relative(x)}"),),
}  # fmt: skip
_HIDDEN_PARAMS = {"base"}  # shown as its own field


def lineage_line(entry: dict[str, Any]) -> str:
    """`2026-12-03 08:00 train base=fixtures/tiny-llama rank=8 lr=0.0002 | 40 steps, train loss 1.93`."""
    time = str(entry.get("time", "?")).replace("T", " ").removesuffix("Z")[:16]
    params = entry.get("params")
    params = params if isinstance(params, dict) else {}
    settings = [f"{k}={_value(v)}" for k, v in params.items() if k not in _HIDDEN_PARAMS and _is_set(v)]
    fields = [time, str(entry.get("op", "?"))]
    if params.get("base"):
        fields.append(f"base={params['base']}")
    fields += settings
    parents = [short_hash(p) for p in entry.get("parents") or [] if isinstance(p, str)]
    if parents:
        fields.append("from " + ", ".join(parents))
    measured = _metrics(str(entry.get("op")), entry.get("metrics"))
    return " ".join(fields) + (f" | {measured}" if measured else "")


def _metrics(op: str, metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return ""
    shown = [form(metrics[k]) for k, form in _METRICS.get(op, ()) if _is_number(metrics.get(k))]
    totals = metrics.get("totals")
    if op == "extract" and isinstance(totals, dict) and _is_number(totals.get("rel_error")):
        shown.append(f"{totals.get('modules', '?')} modules, rel. error {relative(totals['rel_error'])}")
    lost = metrics.get("lost")
    if op == "convert" and isinstance(lost, list) and lost:
        shown.append(
            "lost " + ", ".join(f"{x.get('what')} ({x.get('count')})" if isinstance(x, dict) else str(x) for x in lost)
        )
    return ", ".join(shown)


def _is_set(value: Any) -> bool:
    """Defaults read as None, False or empty: they say nothing about this step."""
    return value is not None and value is not False and value != [] and value != {} and value != ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
