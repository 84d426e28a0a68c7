"""Compact summaries of module paths: `model.layers.{0..31}.self_attn.{q,v}_proj`.

Thousands of modules collapse into a few lines when they share everything but layer
indices and a projection name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Hashable, Mapping
from typing import TypeVar

_NUM = re.compile(r"^\d{1,18}$")  # an index; longer digit runs (a hostile name's) are words
K = TypeVar("K", bound=Hashable)


def summarize(modules: Mapping[str, K]) -> list[tuple[str, K, int]]:
    """Group paths with equal attributes into patterns: (pattern, attrs, number of modules), sorted."""
    numbers: dict[tuple[str, K], set[tuple[int, ...]]] = {}
    for path, attrs in modules.items():
        parts = path.split(".")
        template = ".".join("#" if _NUM.match(p) else p for p in parts)
        numbers.setdefault((template, attrs), set()).add(tuple(int(p) for p in parts if _NUM.match(p)))
    leaves: dict[tuple[str, frozenset[tuple[int, ...]], K], list[str]] = {}
    rows = []
    for (template, attrs), found in numbers.items():
        head, _, leaf = template.rpartition(".")
        if leaf == "#":  # `to_out.0`: the index is the leaf, filled like any other, never shown as '#'
            rows.append((_fill(template, frozenset(found)), attrs, len(found)))
        else:
            leaves.setdefault((head, frozenset(found), attrs), []).append(leaf)
    for (head, nums, attrs), names in leaves.items():
        filled = _fill(head, nums)
        rows.append(((filled + "." if filled else "") + _alternatives(sorted(names)), attrs, len(nums) * len(names)))
    return sorted(rows, key=lambda r: natural_key(r[0]))


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Numbers by value, so that `h.2` sorts before `h.10`."""
    return tuple((0, int(p)) if _NUM.match(p) else (1, p) for p in re.split(r"(\d+)", name) if p)


def _fill(template: str, numbers: frozenset[tuple[int, ...]]) -> str:
    """Replace each '#' by the range of values at that position (exact when the set is a product)."""
    columns = [sorted(set(c)) for c in zip(*numbers, strict=True)] if numbers else []
    product = len(numbers) == math.prod(map(len, columns)) if columns else True
    parts, i = template.split("."), 0
    out = []
    for p in parts:
        if p == "#":
            out.append(_ranges(columns[i]) if product else "*")
            i += 1
        else:
            out.append(p)
    return ".".join(out)


def _ranges(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values[-1] - values[0] + 1 == len(values):  # sorted and distinct: a run without gaps
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def _alternatives(leaves: list[str]) -> str:
    """['q_proj', 'v_proj'] → '{q,v}_proj'."""
    if len(leaves) == 1:
        return leaves[0]
    prefix = os.path.commonprefix(leaves)
    suffix = os.path.commonprefix([s[len(prefix) :][::-1] for s in leaves])[::-1]
    middles = [s[len(prefix) : len(s) - len(suffix)] for s in leaves]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"
