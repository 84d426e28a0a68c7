"""Rich rendering of an `Inspection`."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..inspection import Inspection, architecture_line
from ..patterns import natural_key
from ._lineage_render import lineage_line
from ._text import human_size, name_table, short_hash, short_sha


def render(report: Inspection, console: Console) -> None:
    doc = report.to_dict()
    flags = [name for name in ("rslora", "dora", "lora_bias", "fan_in_fan_out") if doc[name]]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")  # a long path wraps whole rather than losing its end
    rows = [
        ("path", doc["path"]),
        ("format", doc["format"]),
        ("base model", doc["base_model"] or "-"),
        *([("architecture", architecture_line(doc["architecture"]))] if doc["architecture"] else []),
        ("modules", f"{doc['modules']} ({', '.join(doc['kinds'])})"),
        *([("algorithm", ", ".join(doc["algorithms"]))] if doc["lycoris"] else []),
        ("ranks", ", ".join(map(str, doc["ranks"]))),
        ("targets", ", ".join(doc["target_modules"])),
        ("flags", ", ".join(flags) or "-"),
        ("full tensors", ", ".join(f"{k} {v}" for k, v in doc["full_tensors"].items()) or "-"),
        ("parameters", f"{doc['parameters']:,}"),
        ("dtype", ", ".join(doc["dtypes"])),
        ("file size", human_size(doc["file_size"])),
        ("content hash", _hash_line(report)),
    ]
    if report.origin:
        o = report.origin
        rows += [("pulled from", f"{o.get('source', '?')}@{o.get('revision', '?')}"), ("pulled", _pulled_line(report))]
    if doc["base_fingerprint"]:
        rows.append(("base fingerprint", short_hash(doc["base_fingerprint"])))
    for key, value in rows:  # values from files are escaped; the two lines with markup escape their own parts
        head.add_row(key, value if key in ("content hash", "pulled") else escape(str(value)))
    console.print(head)
    patterns = [
        (p.pattern, str(p.rank), f"{p.alpha:g}" if p.alpha is not None else "-", f"{p.scale:.6g}", str(p.count))
        for p in report.patterns
    ]
    headers = ("modules", "rank", "alpha", "scale", "count")
    console.print(name_table(console, headers, patterns, title="modules by pattern"))
    if report.structures:
        rows_ = [(r.pattern, r.structure, str(r.rank), str(r.count)) for r in report.structures]
        heads = ("modules", "stored as", "LoRA rank", "count")
        console.print(name_table(console, heads, rows_, title="LyCORIS modules (read as the exact LoRA of that rank)"))
    if report.stats is not None:
        stats = [
            (name, f"{s.delta_norm:.4g}", str(s.nonfinite) if s.nonfinite else "-")
            for name, s in sorted(report.stats.items(), key=lambda kv: natural_key(kv[0]))
        ]
        console.print(name_table(console, ("module", "‖ΔW‖_F", "NaN/Inf"), stats, title="per-module statistics"))
    for entry in doc["lineage"]:
        console.print(f"lineage: {lineage_line(entry)}", highlight=False, markup=False)
    for f in report.info.findings:
        console.print(f"[yellow]{f.severity}[/] \\[{f.code}] {escape(f.render())}", highlight=False)


def _hash_line(report: Inspection) -> str:
    computed, recorded = escape(short_hash(report.computed_hash)), escape(short_hash(report.recorded_hash))
    pulled = (report.origin or {}).get("content_hash")
    if report.computed_hash is None:
        if report.recorded_hash:
            return f"{recorded} (recorded)"
        return f"{short_hash(str(pulled))} (verified by pull)" if pulled else "not recorded (use --stats to compute)"
    if report.hash_ok is False:
        return f"{computed} [red]MISMATCH[/] (recorded {recorded})"
    return f"{computed} ({'verified' if report.hash_ok else 'computed'})"


def _pulled_line(report: Inspection) -> str:
    """The commit `pull` resolved and the content hash it verified (flagged if the files changed since)."""
    o = report.origin or {}
    line = f"commit {escape(short_sha(str(o.get('commit') or '')))}"
    if o.get("content_hash"):
        line += f", verified {escape(short_hash(str(o['content_hash'])))}"
    current = report.computed_hash or report.recorded_hash
    if o.get("content_hash") and current and o["content_hash"] != current:
        line += " [red]changed since the pull[/]"
    return line
