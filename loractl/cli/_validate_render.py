"""Text, JSON and GitHub-annotation rendering of validation reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..validation import ValidationReport
from ._output import emit_json

if TYPE_CHECKING:
    from rich.console import Console


def render(reports: list[ValidationReport], style: str, strict: bool, console: Console) -> None:
    if style == "json":
        emit_json(
            {
                "ok": not any(r.failed(strict) for r in reports),
                "strict": strict,
                "reports": [r.to_dict() for r in reports],
            }
        )
    elif style == "github":
        for r in reports:
            for f in r.findings:
                level = "error" if f.severity == "error" or strict else "warning"
                print(
                    f"::{level} file={_escape(f.path or r.path, True)},title=loractl {f.code}::{_escape(f.render(), False)}"
                )
    else:
        for r in reports:
            mark = "[red]FAIL[/]" if r.failed(strict) else "[green]ok[/]"
            console.print(f"{mark} {r.path}" + (f" ({r.format})" if r.format else ""), highlight=False)
            for f in r.findings:
                color = "red" if f.severity == "error" else "yellow"
                console.print(f"  [{color}]{f.severity}[/] [{f.code}] {f.render()}", highlight=False, markup=True)


def _escape(text: str, prop: bool) -> str:
    """GitHub workflow-command escaping (properties also escape ':' and ',')."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text
