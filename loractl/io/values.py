"""Values read from files strangers wrote: JSON documents and the numbers in them, checked at the edge.

Readers call these instead of `json.loads` / `float()` / `int()` on file contents, so a hostile
config (NaN alphas, ranks of -1 or "x", 100,000 nested brackets, bytes that are not UTF-8)
ends as a `FormatError` naming the file and the field, never as a ValueError deep in an op.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import FormatError

MAX_JSON_BYTES = 16 << 20  # configs and metadata records are kilobytes
_FIX_JSON = "the JSON is damaged: fix it, or get the file again"
_FIX_VALUE = "fix that value in the file, or get the file again"
MAX_NAME_CHARS = 1024  # tensor names: real ones are under 300 characters
MAX_INT = 2**31  # ranks, layer counts: a larger one is no real model's


def load_json(path: Path) -> Any:
    """The JSON document in `path`; `FormatError` if unreadable, too big, not UTF-8, not JSON, or too deep."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FormatError(f"JSON file is over the cap of {MAX_JSON_BYTES} bytes", path=path)
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", path=path) from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"not valid JSON ({str(e)[:80]})", path=path, hint=_FIX_JSON) from None


def parse_json(raw: str, what: str, path: Path) -> Any:
    """`json.loads(raw)` for a JSON string inside a file (metadata); `FormatError` naming `what`."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise FormatError(f"{what} is not valid JSON", path=path, hint=_FIX_JSON) from None


def finite_number(value: Any, field: str, path: Path | None = None) -> float:
    """`value` as a finite float; bools, strings, NaN, infinities and integers beyond a float are refused naming `field`."""
    number = _as_float(value)
    if number is None or not math.isfinite(number):
        raise FormatError(f"{field} must be a finite number, not {shown(value)}", path=path, hint=_FIX_VALUE)
    return number


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer of 309 digits or more
        return None


def scalar_alpha(checkpoint: Any, key: str, path: Path) -> float:
    """A stored alpha tensor's one finite value (kohya, diffusers `.alpha` keys) in an open `Checkpoint`, its
    shape checked before it is read."""
    shape = checkpoint.info(key).shape
    if math.prod(shape) != 1:
        raise FormatError(f"tensor {key!r} is {list(shape)}, not a scalar alpha", path=path)
    return finite_number(float(checkpoint.get(key).float().item()), key, path)


def positive_int(value: Any, field: str, path: Path | None = None) -> int:
    """`value` as an int in [1, 2^31); anything else is refused naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < MAX_INT:
        raise FormatError(
            f"{field} must be a positive integer below 2^31, not {shown(value)}", path=path, hint=_FIX_VALUE
        )
    return value


def shown(value: Any) -> str:
    """A value read from a file, cut to fit in one line of an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(str(value)[:40])


def tensor_name(name: str, path: Path) -> str:
    """A tensor name from a file, refused when longer than any real one (it would flood every message naming it)."""
    if len(name) > MAX_NAME_CHARS:
        raise FormatError(
            f"a tensor name of {len(name)} characters exceeds the cap of {MAX_NAME_CHARS}",
            path=path,
            hint="tensor names are module paths; this file was not written by a training library",
        )
    return name
