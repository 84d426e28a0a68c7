"""Text, JSON and GitHub-annotation rendering of validation reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..findings import Finding
from ..patterns import summarize
from ..validation import ValidationReport
from ._output import emit_json
from ._text import printable

if TYPE_CHECKING:
    from rich.console import Console

GROUP_AFTER = 3  # more findings of one code than this print as one line with a count and an example


def render(reports: list[ValidationReport], style: str, strict: bool, console: Console) -> None:
    if style == "json":
        from ..validation import ValidationRun

        emit_json(ValidationRun(reports, strict).to_dict())
    elif style == "github":
        for r in reports:
            for f in r.findings:
                level = "error" if f.severity == "error" or strict else "warning"
                print(
                    f"::{level} file={_escape(f.path or r.path, True)},title=loractl {f.code}::{_escape(_with_hint(f), False)}"
                )
    else:
        for r in reports:
            _render_text(r, strict, console)


def _render_text(report: ValidationReport, strict: bool, console: Console) -> None:
    """The verdict, the summary, then findings: a code repeated over many modules is one line with a count."""
    from rich.markup import escape

    mark = "[red]FAIL[/]" if report.failed(strict) else "[green]ok[/]"
    console.print(f"{mark} {escape(report.path)}" + (f" ({report.format})" if report.format else ""), highlight=False)
    for line in report.summary:
        console.print(f"  {escape(line)}", highlight=False)
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in report.findings:
        groups.setdefault((f.code, f.severity), []).append(f)
    for (code, severity), found in groups.items():
        color = "red" if severity == "error" else "yellow"
        lead = f"  [{color}]{severity}[/] \\[{code}]"
        if len(found) <= GROUP_AFTER:
            for f in found:
                console.print(f"{lead} {escape(f.render())}", highlight=False)
        else:
            modules = {f.module: 0 for f in found if f.module}
            where = "; ".join(p for p, _, _ in summarize(modules)) if modules else ""
            console.print(f"{lead} {len(found)} times" + (f" in {escape(where)}" if where else ""), highlight=False)
            console.print(f"    e.g. {escape(found[0].render())}", highlight=False)
        for hint in dict.fromkeys(f.hint for f in found if f.hint):
            console.print(f"    hint: {escape(hint)}", highlight=False)


def _with_hint(f: Finding) -> str:
    return f"{f.render()} (hint: {f.hint})" if f.hint else f.render()


def _escape(text: str, prop: bool) -> str:
    """GitHub workflow-command escaping (properties also escape ':' and ',')."""
    text = printable(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text
