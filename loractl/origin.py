"""The record `pull` leaves beside an adapter: where it came from (remote, revision, commit, hash).

Its own small module so `inspect` can show it without importing the remote layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FormatError
from .io.values import load_json

ORIGIN_FILE = ".loractl-origin.json"


def read_origin(path: str | Path) -> dict[str, Any] | None:
    """The origin record of the adapter at `path` (a directory or a file in it), or None."""
    origin = Path(path) / ORIGIN_FILE if Path(path).is_dir() else Path(path).parent / ORIGIN_FILE
    if not origin.is_file():
        return None
    try:
        doc = load_json(origin)
    except FormatError:
        return None
    return doc if isinstance(doc, dict) else None
