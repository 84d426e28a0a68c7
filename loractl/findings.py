"""Problems found in an adapter: what `validate` reports and readers refuse on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: a stable `code` for CI filters, where it is, and what is wrong."""

    code: str
    severity: Severity
    message: str
    module: str | None = None
    path: str | None = None
    hint: str | None = None  # what to do about it, when there is something to do (an error's hint)

    def render(self) -> str:
        where = f"module {self.module!r}: " if self.module else ""
        return f"{where}{self.message}"


def error(code: str, message: str, module: str | None = None) -> Finding:
    return Finding(code, "error", message, module)


def warning(code: str, message: str, module: str | None = None) -> Finding:
    return Finding(code, "warning", message, module)
