"""llama.cpp's own quantizer and dequantizer, called through ctypes in `libggml-base`.

gguf-py can dequantize K and IQ types but quantize none of them; llama.cpp's `ggml_quantize_chunk`
is what `llama-quantize` itself calls, so a tensor requantized here holds the bytes llama.cpp would
have written from the same floats (rows are independent: chunking them over threads changes no
byte). The library ships with llama-cpp-python (`loractl[gguf-quant]`); it is loaded on first use.
ctypes releases the GIL during each call, so row chunks run on every core.
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    import numpy as np

HINT = "pip install 'loractl[gguf-quant]' (llama-cpp-python, which ships llama.cpp's quantizer)"
# The storage types `ggml_quantize_chunk` takes (any other aborts the process): ggml.c's switch.
QUANTIZABLE = frozenset({
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
})  # fmt: skip
CHUNK_ROWS = 64  # rows per quantize call: small enough to spread over the cores, large enough to amortize a call


class _Traits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def available() -> bool:
    """Whether llama.cpp's library can be loaded (without loading it)."""
    return _library_path() is not None


def _library_path() -> Path | None:
    spec = find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    name = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}.get(sys.platform, "libggml-base.so")
    return lib / name if (lib / name).is_file() else None


@cache
def library() -> ctypes.CDLL:
    """libggml-base, with the signatures loractl calls; `UsageError` with the extra to install when absent."""
    path = _library_path()
    if path is None:
        raise UsageError("merging into K-quant and IQ tensors needs llama.cpp's quantizer, which is not installed",
                         hint=HINT)  # fmt: skip
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


@cache
def _pool() -> ThreadPoolExecutor:
    """One pool for every call (a merge quantizes a block of rows per call)."""
    return ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8)), thread_name_prefix="loractl-ggml")


@cache
def type_id(name: str) -> int:
    """ggml's enum value for the type `name`, checked against ggml's own name for it."""
    from ..formats.gguf.names import require_gguf

    if name not in QUANTIZABLE:  # ggml aborts the process on a type it does not have
        raise UsageError(f"llama.cpp's quantizer does not take the type {name}", hint=HINT)
    value = int(require_gguf().GGMLQuantizationType[name].value)
    traits = library().ggml_get_type_traits(value).contents
    if (traits.type_name or b"").decode().upper() != name.upper():
        raise UsageError(f"this llama.cpp library does not know the type {name} as gguf-py does", hint=HINT)
    return value


def can_quantize(name: str) -> bool:
    """Whether llama.cpp can both quantize to and dequantize from `name` (loads the library)."""
    return name in QUANTIZABLE and bool(library().ggml_get_type_traits(type_id(name)).contents.to_float)


def requires_imatrix(name: str) -> bool:
    """Whether llama.cpp refuses to quantize `name` without an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S…)."""
    return bool(library().ggml_quantize_requires_imatrix(type_id(name)))


def row_size(name: str, n_per_row: int) -> int:
    return int(library().ggml_row_size(type_id(name), n_per_row))


def dequantize(raw: np.ndarray[Any, Any], name: str, count: int) -> np.ndarray[Any, Any]:
    """`count` values of type `name` from the bytes `raw` (C-contiguous), as float32 (ggml's `to_float`)."""
    import numpy as np

    src = np.ascontiguousarray(raw)
    out = np.empty(count, dtype=np.float32)
    _TO_FLOAT(library().ggml_get_type_traits(type_id(name)).contents.to_float)(src.ctypes.data, out.ctypes.data, count)
    return out


def quantize(values: np.ndarray[Any, Any], name: str, importance: np.ndarray[Any, Any] | None = None) -> bytes:
    """`values` (rows × n_per_row, float32; more dimensions are rows too) as ggml stores type `name`: the
    bytes `ggml_quantize_chunk` gives, rows spread over the cores. `importance` is the importance matrix's
    column weights: n_per_row floats, or one such row per matrix of a 3-D tensor (MoE experts)."""
    import numpy as np

    lib, kind = library(), type_id(name)
    n_per_row = int(values.shape[-1])
    src = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, n_per_row)
    rows, size = src.shape[0], row_size(name, n_per_row)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, n_per_row)
    per_matrix = rows // (1 if weights is None else weights.shape[0])
    out = np.empty(rows * size, dtype=np.uint8)
    lib.ggml_quantize_init(kind)

    def chunk(first: int) -> int:
        count = min(CHUNK_ROWS, rows - first, per_matrix - first % per_matrix)
        w = None if weights is None else weights[first // per_matrix].ctypes.data
        return int(lib.ggml_quantize_chunk(kind, src.ctypes.data, out.ctypes.data, first * n_per_row, count,
                                           n_per_row, w))  # fmt: skip

    starts, first = [], 0
    while first < rows:
        starts.append(first)
        first += min(CHUNK_ROWS, rows - first, per_matrix - first % per_matrix)
    written = sum(_pool().map(chunk, starts))
    if written != out.nbytes:
        raise RuntimeError(f"internal: ggml_quantize_chunk wrote {written} bytes of {name}, not {out.nbytes}")
    return out.tobytes()
