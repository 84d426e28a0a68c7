"""Conversions between torch tensors, safetensors dtype codes and raw bytes."""

from __future__ import annotations

from typing import IO

import torch

from ..errors import LoractlError

_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# The header reader accepts U16/U32/U64; torch has them from 2.3 on (bit-exact copies, few ops).
_CODES.update({f"U{bits}": getattr(torch, f"uint{bits}") for bits in (16, 32, 64) if hasattr(torch, f"uint{bits}")})
_BY_DTYPE = {v: k for k, v in _CODES.items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ('F32', 'BF16', ...)."""
    try:
        return _CODES[code]
    except KeyError:
        raise LoractlError(f"dtype {code} is not supported") from None


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise LoractlError(f"dtype {dtype} cannot be stored in safetensors") from None


def tensor_to_bytes(tensor: torch.Tensor, code: str) -> memoryview:
    """Little-endian bytes of `tensor`, which must already have dtype `code`."""
    if tensor.dtype != torch_dtype(code):
        raise LoractlError(f"internal: tensor is {tensor.dtype}, header says {code}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def read_tensor(f: IO[bytes], offset: int, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one tensor's bytes at `offset` straight into a new tensor (one copy, no mmap)."""
    tensor = torch.empty(shape, dtype=torch_dtype(code))
    if tensor.numel():
        buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        f.seek(offset)
        if f.readinto(buf) != len(buf):  # type: ignore[attr-defined]
            raise LoractlError(f"unexpected end of file reading {len(buf)} bytes at offset {offset}")
    return tensor
