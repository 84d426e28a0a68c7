"""Terminal output helpers: stdout for results, stderr for people (STYLE.md habit 10)."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


class LazyConsole:
    """A rich Console created on first use: importing rich costs ~40 ms that `--help` and `--json` skip.

    Attribute access (`print`, `is_terminal`, ...) goes to the real console; pass `.get()` where a
    rich object needs the `Console` itself (a `Progress`, a renderer).
    """

    def __init__(self, to_stderr: bool) -> None:
        self._to_stderr = to_stderr
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            console = Console(file=cast("IO[str]", _Unpadded(self._to_stderr)), soft_wrap=True)
            narrow = not console.encoding.lower().replace("_", "-").startswith("utf")
            self._console = _sanitized(console, spell_out=narrow)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


_PADDING = re.compile(r" +(?=\n)")


class _Unpadded(io.TextIOBase):
    """stdout or stderr (whichever is current) as rich writes to it, without the spaces rich pads lines with.

    Left as is: a terminal's stderr, where live progress bars redraw lines over padded ones.
    """

    def __init__(self, to_stderr: bool) -> None:
        self._to_stderr = to_stderr

    @property
    def _stream(self) -> Any:
        return sys.stderr if self._to_stderr else sys.stdout

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        live = self._to_stderr and self.isatty()
        return int(self._stream.write(text if live else _PADDING.sub("", text)) or 0)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def fileno(self) -> int:
        return int(self._stream.fileno())


# What the output's symbols become on a terminal that cannot show them (an ASCII or Latin-1 locale).
ASCII_FALLBACKS = {
    "→": "->", "←": "<-", "‖": "||", "Δ": "d", "×": "x", "…": "...", "–": "-", "—": "-", "²": "^2",
    "√": "sqrt", "Σ": "sum", "σ": "s", "≈": "~", "≤": "<=", "≥": ">=", "·": "*", "✓": "ok", "✗": "x",
}  # fmt: skip


def _sanitized(console: Console, *, spell_out: bool) -> Console:
    """A console that shows control characters escaped (`printable`: a name from a file cannot drive the
    terminal) and, with `spell_out`, writes symbols its stream cannot encode as their ASCII spelling;
    both before rich measures the text, so table columns stay aligned (the stream's error handler is
    the last resort)."""
    from ._text import printable

    table = str.maketrans(ASCII_FALLBACKS) if spell_out else {}
    render_str = console.render_str

    def sanitized(text: str, **kwargs: Any) -> Any:
        return render_str(printable(text).translate(table), **kwargs)

    console.render_str = sanitized  # type: ignore[method-assign]
    return console


def _ascii_fallback(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: a symbol the stream's encoding lacks becomes its ASCII spelling (else '?')."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    bad = error.object[error.start : error.end]
    return "".join(ASCII_FALLBACKS.get(c, "?") for c in bad), error.end


def tolerate_narrow_encodings() -> None:
    """Never crash after the work is done because stdout or stderr cannot encode an arrow or a ‖.

    Python's streams on a non-UTF-8 locale raise `UnicodeEncodeError`; ours write a fallback instead.
    """
    import codecs

    codecs.register_error("loractl-ascii", _ascii_fallback)
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("_", "-")
        if encoding not in ("utf-8", "utf8") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="loractl-ascii")


stdout = LazyConsole(to_stderr=False)
stderr = LazyConsole(to_stderr=True)


JSON_SCHEMA_VERSION = 1  # raised when a document changes incompatibly (a key removed or its meaning changed)


class Report(Protocol):
    """What every library result a command reports has: its `--json` document (`emit_json` prints it)."""

    def to_dict(self) -> dict[str, Any]: ...


def emit_json(doc: dict[str, Any]) -> None:
    """One JSON document on stdout, stamped `"schema": "loractl/COMMAND/VERSION"` (docs/json.md)."""
    import click

    ctx = click.get_current_context(silent=True)
    command = ctx.command.name if ctx is not None and ctx.command.name else "loractl"
    stamped = {"schema": f"loractl/{command}/{JSON_SCHEMA_VERSION}", **doc}
    sys.stdout.write(json.dumps(stamped, indent=2, default=_json_value) + "\n")


def _json_value(value: Any) -> Any:
    """Times as ISO 8601 (`2026-12-03T08:00:00+00:00`), anything else (paths) as text."""
    from datetime import datetime

    return value.isoformat() if isinstance(value, datetime) else str(value)


def progress(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""
    if not stderr.is_terminal:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr.get(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def wrote_plot(path: object) -> None:
    """Where `--plot` put its picture (on stderr, so that `--json` keeps stdout to its document)."""
    stderr.print(f"plot: {path}", highlight=False, markup=False)


def warn(message: str) -> None:
    from rich.markup import escape

    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
