"""The one vocabulary of dtype names a user may type (`--dtype`), as safetensors dtype codes."""

from __future__ import annotations

from ..errors import UsageError

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# The names transformers writes as `torch_dtype` in config.json, by code.
CONFIG_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_NAMES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
}  # fmt: skip


def parse_dtype(name: str) -> str:
    """The code ('F32', 'BF16', 'F16') of an output dtype name, in any case; `UsageError` otherwise."""
    code = _NAMES.get(name.lower())
    if code is None:
        raise UsageError(f"unknown dtype {name!r}", hint="choose float32, bfloat16 or float16")
    return code
