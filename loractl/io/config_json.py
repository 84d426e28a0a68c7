"""The one reader of a model's transformers `config.json`: size- and depth-checked like every JSON input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FormatError
from .values import load_json

CONFIG_NAME = "config.json"


def read_config(model: Path) -> dict[str, Any] | None:
    """The `config.json` of a model directory (`model` may be a file inside it); None when there is none.

    Raises `FormatError` when the file is unreadable, too big, too deep or not a JSON object.
    """
    path = (model if model.is_dir() else model.parent) / CONFIG_NAME
    if not path.is_file():
        return None
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise FormatError("config is not a JSON object", path=path)
    return doc
