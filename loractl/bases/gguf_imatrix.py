"""llama.cpp's importance matrix (`llama-imatrix`), read as `llama-quantize --imatrix` reads it.

Two layouts: the GGUF one (`general.type` imatrix; per weight `<name>.in_sum2`, the summed squared
activations per column and matrix, and `<name>.counts`, the calls per matrix: the weights are
sum / count, 1 where a matrix saw no input) and the legacy `.dat` (int32 entry count; per entry the
name, `ncall`, `nval` and nval float32 values, divided by ncall). Both give, per GGUF tensor name,
the column weights `ggml_quantize_chunk` takes, computed in float32 as llama.cpp computes them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError

if TYPE_CHECKING:
    import numpy as np

HINT = "pass the file llama-imatrix wrote (imatrix.gguf, or a legacy imatrix.dat)"
MAX_NAME = 4096  # bytes: a GGUF tensor name is at most 64; a longer one is a damaged file


def read_imatrix(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The column weights per tensor name (float32, n_per_row × matrices)."""
    if not path.is_file():
        raise FormatError("importance matrix not found", path=path, hint=HINT)
    with path.open("rb") as f:
        magic = f.read(4)
    weights = _from_gguf(path) if magic == b"GGUF" else _from_dat(path)
    if not weights:
        raise FormatError("importance matrix without entries", path=path, hint=HINT)
    return weights


def _from_gguf(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    import numpy as np

    from ..formats.gguf.names import require_gguf

    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(path)
        kind = reader.fields["general.type"].contents() if "general.type" in reader.fields else None
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    except Exception as e:  # gguf-py parsing a hostile file: any failure is the file's
        raise FormatError(f"not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})", path=path) from None
    if kind != "imatrix":
        raise FormatError(f"GGUF file of type {kind!r}, not an importance matrix", path=path, hint=HINT)
    out = {}
    for name in (n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2")):
        sums, counts = tensors[f"{name}.in_sum2"], tensors.get(f"{name}.counts")
        if counts is None or counts.size != (sums.shape[0] if sums.ndim > 1 else 1):
            raise FormatError(f"{name}: in_sum2 without matching counts", path=path, hint=HINT)
        rows = sums.reshape(counts.size, -1)
        c = counts.reshape(-1, 1)
        out[name] = np.where(c > 0, rows / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).reshape(-1)
    return out


def _from_dat(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    import numpy as np

    data = path.read_bytes()
    at = 0

    def take(n: int, what: str) -> bytes:
        nonlocal at
        if n < 0 or at + n > len(data):
            raise FormatError(f"not an importance matrix: truncated at {what} (byte {at})", path=path, hint=HINT)
        at += n
        return data[at - n : at]

    (entries,) = struct.unpack("<i", take(4, "the entry count"))
    if entries < 1 or entries * 12 > len(data):
        raise FormatError(f"not an importance matrix: {entries} entries in {len(data)} bytes", path=path, hint=HINT)
    out = {}
    for _ in range(entries):
        (length,) = struct.unpack("<i", take(4, "a name length"))
        if not 0 < length <= MAX_NAME:
            raise FormatError(f"not an importance matrix: a name of {length} bytes", path=path, hint=HINT)
        name = take(length, "a name").decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8, f"{name}'s counts"))
        if nval < 1:
            raise FormatError(f"importance matrix entry {name!r} has {nval} values", path=path, hint=HINT)
        values = np.frombuffer(take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float32)
        out[name] = values / np.float32(ncall) if ncall > 0 else values
    return out
