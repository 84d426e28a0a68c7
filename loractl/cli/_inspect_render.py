"""Rich rendering of an `Inspection`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..inspection import Inspection


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def render(report: Inspection, console: Console) -> None:
    doc = report.to_dict()
    flags = [name for name in ("rslora", "dora", "lora_bias", "fan_in_fan_out") if doc[name]]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("path", doc["path"]),
        ("format", doc["format"]),
        ("base model", doc["base_model"] or "-"),
        ("modules", f"{doc['modules']} ({', '.join(doc['kinds'])})"),
        ("ranks", ", ".join(map(str, doc["ranks"]))),
        ("targets", ", ".join(doc["target_modules"])),
        ("flags", ", ".join(flags) or "-"),
        ("full tensors", ", ".join(f"{k} {v}" for k, v in doc["full_tensors"].items()) or "-"),
        ("parameters", f"{doc['parameters']:,}"),
        ("dtype", ", ".join(doc["dtypes"])),
        ("file size", _size(doc["file_size"])),
        ("content hash", _hash_line(report)),
    ]
    if report.origin:
        rows.append(("origin", _origin_line(report)))
    if doc["base_fingerprint"]:
        rows.append(("base fingerprint", doc["base_fingerprint"]))
    for key, value in rows:
        head.add_row(key, str(value))
    console.print(head)
    patterns = Table("modules", "rank", "alpha", "scale", "count", title="modules by pattern", title_justify="left")
    for p in report.patterns:
        patterns.add_row(
            p.pattern, str(p.rank), f"{p.alpha:g}" if p.alpha is not None else "-", f"{p.scale:.6g}", str(p.count)
        )
    console.print(patterns)
    if report.stats is not None:
        stats = Table("module", "‖ΔW‖_F", "NaN/Inf", title="per-module statistics", title_justify="left")
        for name, s in report.stats.items():
            stats.add_row(name, f"{s.delta_norm:.4g}", str(s.nonfinite) if s.nonfinite else "-")
        console.print(stats)
    for entry in doc["lineage"]:
        parents = ", ".join(p[:19] for p in entry.get("parents", []))
        console.print(
            f"lineage: {entry.get('time', '?')} {entry.get('op')} {entry.get('params', {})} from {parents or '-'}"
        )
    for f in report.info.findings:
        console.print(f"[yellow]{f.severity}[/] [{f.code}] {f.render()}", highlight=False)


def _hash_line(report: Inspection) -> str:
    if report.computed_hash is None:
        return f"{report.recorded_hash} (recorded)" if report.recorded_hash else "not recorded (use --stats to compute)"
    if report.hash_ok is False:
        return f"{report.computed_hash} [red]MISMATCH[/] (recorded {report.recorded_hash})"
    return f"{report.computed_hash} ({'verified' if report.hash_ok else 'computed'})"


def _origin_line(report: Inspection) -> str:
    o = report.origin or {}
    line = f"{o.get('source', '?')}@{o.get('revision', '?')} = {str(o.get('commit', '?'))[:12]} (pulled)"
    current = report.computed_hash or report.recorded_hash
    if o.get("content_hash") and current and o["content_hash"] != current:
        line += " [red]changed since the pull[/]"
    return line
