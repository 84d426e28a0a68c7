"""A checkpoint transformers saved with bitsandbytes weights, as the `*-bnb-4bit` Hub repos hold.

4-bit (nf4/fp4): a weight is its packed codes (`weight`, uint8, two per byte), `weight.absmax` (one
per block; with double quantization itself 8-bit codes with `weight.nested_absmax` and
`weight.nested_quant_map`), `weight.quant_map` and `weight.quant_state.bitsandbytes__nf4` (JSON bytes:
blocksize, shape, dtype, the nested offset). 8-bit (LLM.int8): an int8 `weight` and the row scales
`SCB` (W = codes · SCB / 127), beside `weight_format`. Dequantizing and requantizing are bitsandbytes'
own functions, with the settings the file records (read by loractl's checked JSON parser, never by
bitsandbytes' unchecked one). A merge writes the weights dequantized, in the compute dtype
(`bnb_4bit_compute_dtype`, else the config's dtype, else bf16) with `quantization_config` removed,
unless `--keep-quant` requantizes them as they were (same blocksize, type, double quantization).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from ..io.values import parse_json
from ._quantized_dir import Encoded, QuantizedCheckpoint, Stored, quant_method, quantization_config
from .protocol import OutputChoices

if TYPE_CHECKING:
    import torch

    from ..io.checkpoint import Checkpoint

TAKES_OUTPUT_CHOICES = True
STATE = ".quant_state.bitsandbytes__"
_COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_BLOCKSIZES = frozenset(2**i for i in range(5, 13))
STATE_ROOM = 32  # bytes a requantized weight's JSON state may grow by (its nested offset's digits)


def detect(path: Path) -> bool:
    """A checkpoint directory whose config.json says `quant_method: bitsandbytes`."""
    return quant_method(path) == "bitsandbytes"


def open(path: Path, choices: OutputChoices | None = None) -> QuantizedCheckpoint:
    from ..extras import require_extra

    require_extra("qlora", purpose="a bitsandbytes checkpoint")
    return QuantizedCheckpoint(path, BnbCodec(), choices)


class BnbCodec:
    """bitsandbytes' 4-bit and 8-bit serializations (`_quantized_dir.Codec`)."""

    method = "bitsandbytes"
    keeps_by_default = False

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}  # 4-bit weight → its checked JSON state
        self._absmax_of: tuple[str, Any] = ("", None)

    def find(self, ckpt: Checkpoint) -> dict[str, Stored]:
        out = {}
        for name in ckpt.names:
            if not name.endswith(".weight"):
                continue
            kind = next((q for q in ("nf4", "fp4") if f"{name}{STATE}{q}" in ckpt), None)
            if kind is not None:
                out[name] = self._four_bit(ckpt, name, kind)
            elif ckpt.info(name).dtype == "I8" and f"{name.removesuffix('.weight')}.SCB" in ckpt:
                out[name] = _eight_bit(ckpt, name)
        return out

    def _four_bit(self, ckpt: Checkpoint, name: str, kind: str) -> Stored:
        state = _state(ckpt, name, kind)
        self.states[name] = state
        keys = (name, *(name + s for s in _COMPANIONS if name + s in ckpt), f"{name}{STATE}{kind}")
        _check_four_bit(ckpt, name, state, keys)
        return Stored(name, tuple(state["shape"]), kind.upper(), keys)

    def dequantize(self, ckpt: Checkpoint, w: Stored) -> torch.Tensor:
        import bitsandbytes.functional as F

        if w.scheme == "INT8":
            values: torch.Tensor = F.int8_vectorwise_dequant(ckpt.get(w.name), ckpt.get(w.keys[1]).float())
            return values.float()
        return F.dequantize_4bit(ckpt.get(w.name), self._quant_state(ckpt, w)).float()

    def encode(self, ckpt: Checkpoint, w: Stored, start: torch.Tensor, values: torch.Tensor) -> Encoded:
        """Requantized as transformers quantizes at load: 4-bit from the weight's own dtype, 8-bit from float16."""
        import bitsandbytes.functional as F
        import torch

        if w.scheme == "INT8":
            codes, scb, _ = F.int8_vectorwise_quant(values.to(torch.float16))
            back = F.int8_vectorwise_dequant(codes, scb).float()
            return Encoded({w.name: codes, w.keys[1]: scb, w.keys[2]: ckpt.get(w.keys[2])}, back)
        state = self.states[w.name]
        packed, qs = F.quantize_4bit(
            values.to(getattr(torch, state["dtype"])), blocksize=state["blocksize"],
            compress_statistics="nested_offset" in state, quant_type=state["quant_type"], quant_storage=torch.uint8,
        )  # fmt: skip
        tensors = {f"{w.name}.{k}": v for k, v in qs.as_dict(packed=True).items()}
        key = f"{w.name}{STATE}{state['quant_type']}"
        room = self.merged_shape(key, ckpt.info(key).shape)[0]
        tensors[key] = _padded_json(tensors[key], room, ckpt.path)
        return Encoded({w.name: packed, **tensors}, F.dequantize_4bit(packed, qs).float())

    def row_multiple(self, ckpt: Checkpoint, w: Stored, requantize: bool) -> int:
        """8-bit: a row (its scale is the row's). 4-bit: the rows a block of `blocksize` values spans; to
        requantize, the whole weight (double quantization's offset is the mean of every block's absmax)."""
        if w.scheme == "INT8":
            return 1
        rows, cols = w.shape
        size = int(self.states[w.name]["blocksize"])
        return rows if requantize else size // math.gcd(cols, size)

    def dequantize_rows(self, ckpt: Checkpoint, w: Stored, start: int, stop: int) -> torch.Tensor:
        import bitsandbytes.functional as F
        from bitsandbytes.functional import QuantState

        if w.scheme == "INT8":
            codes, scb = ckpt.get_rows(w.name, start, stop), ckpt.get_rows(w.keys[1], start, stop)
            values: torch.Tensor = F.int8_vectorwise_dequant(codes, scb.float())
            return values.float()
        rows, cols = w.shape
        if (start, stop) == (0, rows):
            return self.dequantize(ckpt, w)
        state, size = self._quant_state(ckpt, w), int(self.states[w.name]["blocksize"])
        absmax = self._absmax(w.name, state)
        part = QuantState(absmax=absmax[start * cols // size : -(-stop * cols // size)], shape=(stop - start, cols),  # type: ignore[no-untyped-call]
                          code=state.code, blocksize=size, quant_type=state.quant_type, dtype=state.dtype)  # fmt: skip
        packed = ckpt.get_rows(w.name, start * cols // 2, -(-stop * cols // 2))
        dequantized: torch.Tensor = F.dequantize_4bit(packed, part)
        return dequantized.float()

    def _absmax(self, name: str, state: Any) -> torch.Tensor:
        """Every block's absmax in float32 (double quantization undone as `dequantize_4bit` does), for the last
        weight asked: it is 1/blocksize of the weight, and each of its row blocks needs some of it."""
        import bitsandbytes.functional as F

        if self._absmax_of[0] != name:
            absmax = state.absmax
            if state.nested:
                absmax = F.dequantize_blockwise(state.absmax, state.state2)
                absmax += state.offset
            self._absmax_of = (name, absmax.float())
        out: torch.Tensor = self._absmax_of[1]
        return out

    def encode_rows(
        self, ckpt: Checkpoint, w: Stored, first: int, start: torch.Tensor, values: torch.Tensor
    ) -> Encoded:
        """8-bit: the rows' codes and scales (the format tag with the first rows); 4-bit: the whole weight."""
        import bitsandbytes.functional as F
        import torch

        if w.scheme != "INT8":
            return self.encode(ckpt, w, start, values)
        codes, scb, _ = F.int8_vectorwise_quant(values.to(torch.float16))
        tensors = {w.name: codes, w.keys[1]: scb} | ({w.keys[2]: ckpt.get(w.keys[2])} if first == 0 else {})
        return Encoded(tensors, F.int8_vectorwise_dequant(codes, scb).float())

    def merged_shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0] + STATE_ROOM,) if STATE in key else shape

    def dequantized_dtype(self, ckpt: Checkpoint) -> str:
        q, config = quantization_config(ckpt), ckpt.config()
        name = q.get("bnb_4bit_compute_dtype") if q.get("load_in_4bit") else None
        name = name or config.get("dtype") or config.get("torch_dtype")
        return _DTYPES.get(str(name), "BF16")

    def _quant_state(self, ckpt: Checkpoint, w: Stored) -> Any:
        import torch
        from bitsandbytes.functional import QuantState

        parts = {k.removeprefix(w.name + "."): ckpt.get(k) for k in w.keys[1:-1]}
        return QuantState.from_dict({**parts, **self.states[w.name]}, device=torch.device("cpu"))


def _state(ckpt: Checkpoint, name: str, kind: str) -> dict[str, Any]:
    """The weight's JSON state, checked: every value bitsandbytes will read has a sane type and range."""
    key = f"{name}{STATE}{kind}"
    raw = ckpt.raw_bytes(key)
    try:
        state = parse_json(raw.decode("utf-8"), f"{key}", ckpt.path)
    except UnicodeDecodeError:
        state = None
    shape = state.get("shape") if isinstance(state, dict) else None
    good = (
        isinstance(state, dict)
        and state.get("quant_type") == kind
        and state.get("blocksize") in _BLOCKSIZES
        and state.get("dtype") in _DTYPES
        and isinstance(shape, list) and len(shape) == 2
        and all(isinstance(n, int) and 0 < n < 2**31 for n in shape)
        and (
            "nested_offset" not in state
            or (state.get("nested_blocksize") in _BLOCKSIZES and state.get("nested_dtype") in _DTYPES
                and isinstance(state["nested_offset"], float) and math.isfinite(state["nested_offset"]))
        )
    )  # fmt: skip
    if not good:
        raise FormatError(
            f"{key}: not a bitsandbytes 4-bit state ({raw[:80]!r})",
            path=ckpt.path,
            hint="the checkpoint is damaged; save it again with transformers (save_pretrained)",
        )
    return dict(state)


def _check_four_bit(ckpt: Checkpoint, name: str, state: dict[str, Any], keys: tuple[str, ...]) -> None:
    """The stored tensors have the sizes the state implies (bitsandbytes would read past them otherwise)."""
    n = math.prod(state["shape"])
    nested = "nested_offset" in state
    expected = {name: ("U8", (n + 1) // 2), f"{name}.absmax": ("U8" if nested else "F32", -(-n // state["blocksize"])),
                f"{name}.quant_map": ("F32", 16)}  # fmt: skip
    if nested:
        blocks = -(-expected[f"{name}.absmax"][1] // state["nested_blocksize"])
        expected |= {f"{name}.nested_absmax": ("F32", blocks), f"{name}.nested_quant_map": ("F32", 256)}
    for key, (dtype, count) in expected.items():
        info = ckpt.info(key) if key in keys else None
        if info is None or info.dtype != dtype or info.numel != count:
            have = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
            raise FormatError(
                f"{key}: a 4-bit weight of shape {state['shape']} needs {dtype} with {count} values, found {have}",
                path=ckpt.path,
                hint="the checkpoint is damaged; save it again with transformers (save_pretrained)",
            )


def _eight_bit(ckpt: Checkpoint, name: str) -> Stored:
    shape, module = ckpt.info(name).shape, name.removesuffix(".weight")
    scb, fmt = ckpt.info(f"{module}.SCB"), f"{name}_format"
    if len(shape) != 2 or scb.dtype != "F32" or scb.shape != (shape[0],) or fmt not in ckpt:
        raise FormatError(
            f"{name}: an 8-bit weight {list(shape)} needs {module}.SCB as F32 [{shape[0] if shape else 0}] and {fmt}",
            path=ckpt.path,
            hint="the checkpoint is damaged; save it again with transformers (save_pretrained)",
        )
    return Stored(name, shape, "INT8", (name, f"{module}.SCB", fmt))


def _padded_json(packed: torch.Tensor, length: int, path: Path) -> torch.Tensor:
    """bitsandbytes' packed JSON state padded with spaces to `length` bytes (the header is written first)."""
    import torch

    raw = bytes(packed.numpy())
    json.loads(raw)  # what bitsandbytes wrote parses
    if len(raw) > length:
        raise FormatError(f"internal: a requantized state is {len(raw)} bytes, over {length}", path=path)
    return torch.frombuffer(bytearray(raw.ljust(length)), dtype=torch.uint8)
