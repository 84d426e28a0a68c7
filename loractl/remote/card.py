"""The model card (`README.md`) pushed with every version, and reading its content hash back.

The front matter is what the Hub indexes (`base_model`, `base_model_relation: adapter`,
`library_name`, `tags`) plus a `loractl:` block with the content hash, which `versions`
reads back. The text is a function of the adapter alone (no clock), so pushing the same
adapter twice produces the same card and the second push is a no-op.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..info import AdapterInfo

_HASH = re.compile(r"^---\n(?:.*\n)*?loractl:\n  content_hash: (\"[^\"\n]*\")\n(?:.*\n)*?---\n", re.MULTILINE)
_MAX_MODULE_ROWS = 64
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # the Hub rejects base_model values that are not repo ids


def model_card(info: AdapterInfo, repo_id: str, content_hash: str) -> str:
    """Markdown with YAML front matter: Hub metadata, the inspect summary, the lineage."""
    return "\n".join(
        [
            *_front_matter(info, content_hash),
            f"# {repo_id}",
            "",
            "A LoRA adapter published with loractl.",
            "",
            *_summary(info, content_hash),
            *_modules(info),
            *_lineage(info),
        ]
    )


def card_content_hash(card: str | None) -> str | None:
    """The content hash a loractl card records, or None (no card, or not written by loractl)."""
    match = _HASH.match(card) if card else None
    if not match:
        return None
    value = json.loads(match.group(1))
    return value if isinstance(value, str) else None


def _front_matter(info: AdapterInfo, content_hash: str) -> list[str]:
    lines = ["---"]
    if info.base_model and _HUB_ID.fullmatch(info.base_model):
        lines.append(f"base_model: {_q(info.base_model)}")
    lines.append("base_model_relation: adapter")
    if info.format == "peft":
        lines.append("library_name: peft")
    lines += [
        "tags:",
        "- lora",
        "- loractl",
        "loractl:",
        f"  content_hash: {_q(content_hash)}",
        f"  format: {_q(info.format)}",
        "---",
        "",
    ]
    return lines


def _summary(info: AdapterInfo, content_hash: str) -> list[str]:
    ranks = sorted({m.rank for m in info.modules.values()})
    rows: list[tuple[str, Any]] = [
        ("format", info.format),
        ("base model", info.base_model or "unknown"),
        ("modules", len(info.modules)),
        ("ranks", ", ".join(map(str, ranks)) or "none"),
        ("parameters", f"{info.num_parameters:,}"),
        ("dtypes", ", ".join(info.dtypes) or "none"),
        ("DoRA", "yes" if any(m.dora for m in info.modules.values()) else "no"),
        ("full tensors", len(info.full_tensors)),
        ("content hash", f"`{content_hash}`"),
    ]
    return ["## Summary", "", "| property | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _modules(info: AdapterInfo) -> list[str]:
    names = sorted(info.modules)
    lines = ["## Modules", "", "| module | kind | rank | in | out | scale |", "|---|---|---|---|---|---|"]
    for name in names[:_MAX_MODULE_ROWS]:
        m = info.modules[name]
        lines.append(f"| `{name}` | {m.kind} | {m.rank} | {m.in_features} | {m.out_features} | {m.scale:.6g} |")
    if len(names) > _MAX_MODULE_ROWS:
        lines.append(f"| … {len(names) - _MAX_MODULE_ROWS} more | | | | | |")
    return [*lines, ""]


def _lineage(info: AdapterInfo) -> list[str]:
    entries = info.record.lineage if info.record else ()
    if not entries:
        return ["## Lineage", "", "No recorded operations (the adapter was not made by loractl).", ""]
    lines = ["## Lineage", ""]
    for i, entry in enumerate(entries, 1):
        params = json.dumps(entry.get("params", {}), sort_keys=True)
        parents = ", ".join(f"`{p}`" for p in entry.get("parents", [])) or "none"
        lines.append(f"{i}. `{entry.get('op', '?')}` {params}, parents: {parents}, at {entry.get('time', '?')}")
    return [*lines, ""]


def _q(text: str) -> str:
    """A YAML scalar that is always a string (JSON strings are valid YAML)."""
    return json.dumps(text)
