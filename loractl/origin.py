"""The record `pull` leaves beside an adapter: where it came from (remote, revision, commit, hash).

Its own small module so `inspect` can show it without importing the remote layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORIGIN_FILE = ".loractl-origin.json"


def read_origin(path: str | Path) -> dict[str, Any] | None:
    """The origin record of the adapter at `path` (a directory or a file in it), or None."""
    origin = Path(path) / ORIGIN_FILE if Path(path).is_dir() else Path(path).parent / ORIGIN_FILE
    try:
        doc = json.loads(origin.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
