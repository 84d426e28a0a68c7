"""Words and numbers for the terminal: sizes, hashes, relative errors, names that must stay distinguishable.

Module names are what tells table rows apart, so they are never cut: a name wider than its
column is folded at dots (every line a whole path segment), never in the middle of a word.
Paths in a table fold the same way at slashes; a path in a sentence is shortened from its start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..ops.budget import Allocation

HASH_DIGITS = 12  # after "sha256:": unique in any realistic set of versions
SHA_PREFIX = 12  # git commit shas, as git itself abbreviates them
LONGEST_SEGMENT = 40  # wider than any module segment; only a long directory name is folded inside
_SEGMENT = re.compile(r"(?:\{[^}]*\}|[^./{])+[./]?|[./]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


def printable(text: str) -> str:
    """`text` with control characters shown escaped (`\\x1b`), never sent: text output only (`--json` is JSON).

    Names come from files anyone can write, and a terminal obeys an escape sequence inside one
    (it retitles the window, clears the screen, moves the cursor to fake a line). Tab and newline
    are the output's own layout and pass.
    """
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def budget_line(b: Allocation) -> str:
    """What `--budget` chose against the uniform rank of the same size (extract and resize print it alike)."""
    return (
        f"budget {b.budget:,} params: used {b.params:,}, total rel. error {relative(b.rel_error)}; "
        f"uniform rank {b.uniform_rank} ({b.uniform_params:,} params): {relative(b.uniform_rel_error)}"
    )


def relative(x: float | None) -> str:
    """A relative error or ratio as every command prints one: `0.616`, `4.10`, `6.24e-07`.

    Three significant digits, scientific below 1e-3 and from 1e3, `0` only for an exact zero,
    `n/a` where there is no figure.
    """
    if x is None:
        return "n/a"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"  # 0, inf, nan
    if not 1e-3 <= abs(x) < 1e3:
        return f"{x:.2e}"
    return f"{x:#.3g}".rstrip(".")


def percent(x: float | None) -> str:
    """A share of a whole (the rounding loss of a merge) as a percentage: `12.3%`, `n/a` where there is none."""
    return "n/a" if x is None else f"{x:.1%}"


def fit_path(path: str | Path, width: int) -> str:
    """`path` in at most `width` cells: whole if it fits, else `…` and its end (from a slash where one fits)."""
    text = str(path)
    if len(text) <= width:
        return text
    tail = text[len(text) - width + 1 :]
    cut = tail.find("/")
    return "…" + (tail[cut:] if 0 <= cut < len(tail) - 1 else tail)


def human_size(n: float) -> str:
    """Bytes in decimal units, three significant figures: `429 KB`, `1.24 GB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def short_hash(content_hash: str | None) -> str:
    """A content hash as its fixed prefix (`sha256:` or a per-tensor fingerprint's `sha256t:`, then 12 hex
    digits); `--json` carries the whole hash."""
    return content_hash[: content_hash.find(":") + 1 + HASH_DIGITS] if content_hash else "-"


def short_sha(sha: str | None) -> str:
    """A git commit sha as git abbreviates it."""
    return sha[:SHA_PREFIX] if sha else "-"


def fold_dotted(name: str, width: int) -> str:
    """`name` on lines of at most `width` cells, broken after dots and slashes (a longer segment over whole lines)."""
    lines = [""]
    for part in segments(name):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        while len(part) > width:
            lines[-1:] = [part[:width], ""]
            part = part[width:]
        lines[-1] += part
    return "\n".join(lines)


def segments(name: str) -> list[str]:
    """`name` split after each dot or slash, keeping `{0..31}` ranges whole: the places a name may break."""
    return _SEGMENT.findall(name) or [name]


def adapter_labels(paths: Sequence[str | Path]) -> list[str]:
    """Each adapter by its file or directory name, or by as many trailing components as tell two apart.

    `a/run1/adapter` and `b/run2/adapter` are `run1/adapter` and `run2/adapter`; paths that no tail
    tells apart (the same path twice, one spelt two ways) are shown whole.
    """
    parts = [Path(p).parts or (str(p),) for p in paths]
    distinct = len({str(p) for p in paths})
    for k in range(1, max((len(x) for x in parts), default=0) + 1):
        labels = [str(Path(*x[-k:])) for x in parts]
        if len(set(labels)) == distinct:
            return labels
    return [str(p) for p in paths]


def name_table(
    console: Console,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    name_column: int = 0,
) -> Table:
    """A rich table whose name column gets the width the others leave, its cells folded at dots.

    The other columns hold short figures and keep their natural width. Where the names would not
    fit on one line, a column that holds the same value in every row leaves the table for its
    caption (`every row: rank 8`); names that still do not fit wrap onto more lines, never cut.
    """
    from rich.markup import escape
    from rich.table import Column, Table

    rows = [[printable(str(c)) for c in r] for r in rows]  # measured as they will be shown
    headers, rows, name_column, caption = _without_constant_columns(console, headers, rows, name_column)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    chrome = 3 * len(headers) + 1  # borders and one space of padding each side
    others = sum(w for i, w in enumerate(widths) if i != name_column)
    segment = max([len(headers[name_column]), *(len(p) for r in rows for p in segments(r[name_column]))])
    longest_segment = min(segment, max(LONGEST_SEGMENT, len(headers[name_column])))
    width = max(longest_segment, min(widths[name_column], console.width - others - chrome))
    columns = [
        Column(h, no_wrap=True, min_width=width) if i == name_column else Column(h, overflow="fold")
        for i, h in enumerate(headers)
    ]
    table = Table(*columns, title=title, title_justify="left", caption=caption, caption_justify="left")
    for r in rows:  # cells are text, not markup: a name from a file may hold '[/]'
        table.add_row(*(escape(fold_dotted(c, width) if i == name_column else c) for i, c in enumerate(r)))
    return table


def _without_constant_columns(
    console: Console, headers: Sequence[str], rows: Sequence[Sequence[str]], name_column: int
) -> tuple[Sequence[str], Sequence[Sequence[str]], int, str | None]:
    """The table without the columns that repeat one value in every row, when the names need their room;
    those columns become a caption (escaped: values come from files)."""
    import textwrap

    from rich.markup import escape

    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    if len(rows) < 2 or sum(widths) + 3 * len(headers) + 1 <= console.width:
        return headers, rows, name_column, None
    same = [i for i in range(len(headers)) if i != name_column and len({r[i] for r in rows}) == 1]
    if not same:
        return headers, rows, name_column, None
    keep = [i for i in range(len(headers)) if i not in same]
    caption = "every row: " + ", ".join(f"{headers[i]} {rows[0][i]}" for i in same)
    caption = "\n".join(textwrap.wrap(caption, console.width, break_long_words=False, break_on_hyphens=False))
    return [headers[i] for i in keep], [[r[i] for i in keep] for r in rows], keep.index(name_column), escape(caption)
