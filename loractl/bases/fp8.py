"""A checkpoint of FP8 weights with block scales, the layout DeepSeek-V3 and Qwen3-FP8 publish.

A weight is `float8_e4m3fn` codes (`weight`) and `weight_scale_inv`, one float32 per block of
`quantization_config.weight_block_size` (128 × 128) elements: W = codes · scale_inv, the last row
and column of blocks cut to the weight's shape. A merge keeps FP8 (the config stays): each block
the merge changes gets a new scale, amax / 448 (448 = float8_e4m3fn's largest value) with amax
clamped to 1e-4, and codes = W · (448 / amax), the rule DeepGEMM's `per_block_cast_to_fp8` (which
those publishers quantize with) follows; a block no update changes keeps its codes and scale byte for
byte. `--dtype` writes every weight dequantized in that dtype instead, `quantization_config` removed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from ._quantized_dir import Encoded, QuantizedCheckpoint, Stored, quant_method, quantization_config
from .protocol import OutputChoices

if TYPE_CHECKING:
    import torch

    from ..io.checkpoint import Checkpoint

TAKES_OUTPUT_CHOICES = True
SCALE = "_scale_inv"  # `<module>.weight_scale_inv`
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
AMAX_FLOOR = 1e-4  # DeepGEMM's clamp: an all-zero block still gets a finite scale
_HINT = "loractl merges into FP8 checkpoints with block scales (quant_method fp8, fmt e4m3, weight_block_size)"


def detect(path: Path) -> bool:
    """A checkpoint directory whose config.json says `quant_method: fp8`."""
    return quant_method(path) == "fp8"


def open(path: Path, choices: OutputChoices | None = None) -> QuantizedCheckpoint:
    return QuantizedCheckpoint(path, Fp8Codec(), choices)


class Fp8Codec:
    """Block-scaled float8_e4m3fn weights (`_quantized_dir.Codec`)."""

    method = "fp8"
    keeps_by_default = True

    def find(self, ckpt: Checkpoint) -> dict[str, Stored]:
        block = _block_size(ckpt)
        out = {}
        for name in ckpt.names:
            if name + SCALE in ckpt and name.endswith(".weight"):
                out[name] = _checked(ckpt, name, block)
        self.block = block
        return out

    def dequantize(self, ckpt: Checkpoint, w: Stored) -> torch.Tensor:
        return dequantize(ckpt.get(w.name), ckpt.get(w.name + SCALE), self.block)

    def encode(self, ckpt: Checkpoint, w: Stored, start: torch.Tensor, values: torch.Tensor) -> Encoded:
        return self.encode_rows(ckpt, w, 0, start, values)

    def row_multiple(self, ckpt: Checkpoint, w: Stored, requantize: bool) -> int:
        return self.block[0]

    def dequantize_rows(self, ckpt: Checkpoint, w: Stored, start: int, stop: int) -> torch.Tensor:
        br = self.block[0]
        scales = ckpt.get_rows(w.name + SCALE, start // br, -(-stop // br))
        return dequantize(ckpt.get_rows(w.name, start, stop), scales, self.block)

    def encode_rows(
        self, ckpt: Checkpoint, w: Stored, first: int, start: torch.Tensor, values: torch.Tensor
    ) -> Encoded:
        """Touched blocks requantized (`quantize`); the others keep the stored codes and scale."""
        import torch

        br, rows = self.block[0], values.shape[0]
        codes, scales = quantize(values, self.block)
        old_codes = ckpt.get_rows(w.name, first, first + rows)
        old_scales = ckpt.get_rows(w.name + SCALE, first // br, -(-(first + rows) // br))
        touched = _blocks_changed(start, values, self.block)
        scales = torch.where(touched, scales.to(old_scales.dtype), old_scales)
        keep = _expand(~touched, self.block, tuple(values.shape))
        codes = torch.where(keep, old_codes.view(torch.uint8), codes.view(torch.uint8)).view(torch.float8_e4m3fn)
        return Encoded({w.name: codes, w.name + SCALE: scales}, dequantize(codes, scales, self.block))

    def merged_shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def dequantized_dtype(self, ckpt: Checkpoint) -> str:
        config = ckpt.config()
        name = config.get("dtype") or config.get("torch_dtype")
        return {"float32": "F32", "float16": "F16"}.get(str(name), "BF16")


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """codes · scale_inv of each element's block, in float32 (out, in)."""
    return codes.float() * _expand(scales.float(), block, tuple(codes.shape))


def quantize(values: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn, scale_inv float32 per block) of float32 `values`, amax / 448 per block."""
    import torch

    rows, cols = values.shape
    br, bc = block
    padded = torch.zeros(-(-rows // br) * br, -(-cols // bc) * bc, dtype=torch.float32)
    padded[:rows, :cols] = values
    view = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    amax = view.abs().amax(dim=(1, 3), keepdim=True).clamp(min=AMAX_FLOOR)
    codes = (view * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(padded.shape)[:rows, :cols].contiguous(), (amax / FP8_MAX).view(amax.shape[0], amax.shape[2])


def _expand(per_block: torch.Tensor, block: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """A per-block tensor (row blocks, column blocks) repeated over its blocks and cut to `shape`."""
    rows, cols = shape
    return per_block.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def _blocks_changed(start: torch.Tensor, values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per block: whether any value of `values` differs from `start`."""
    import torch

    rows, cols = values.shape
    br, bc = block
    diff = torch.zeros(-(-rows // br) * br, -(-cols // bc) * bc, dtype=torch.bool)
    diff[:rows, :cols] = start != values
    return diff.view(diff.shape[0] // br, br, diff.shape[1] // bc, bc).any(dim=3).any(dim=1)


def _block_size(ckpt: Checkpoint) -> tuple[int, int]:
    q: dict[str, Any] = quantization_config(ckpt)
    block = q.get("weight_block_size")
    fmt = q.get("fmt", "e4m3")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and 0 < b <= 2**16 for b in block)):
        raise FormatError(f"FP8 checkpoint without a weight_block_size of two sizes ({block!r})", path=ckpt.path,
                          hint=_HINT)  # fmt: skip
    if fmt != "e4m3":
        raise FormatError(f"FP8 checkpoint of format {fmt!r}, not e4m3", path=ckpt.path, hint=_HINT)
    return block[0], block[1]


def _checked(ckpt: Checkpoint, name: str, block: tuple[int, int]) -> Stored:
    info, scale = ckpt.info(name), ckpt.info(name + SCALE)
    if len(info.shape) != 2 or info.dtype != "F8_E4M3":
        raise FormatError(f"{name} is {info.dtype} {list(info.shape)}, not a float8_e4m3fn matrix", path=ckpt.path,
                          hint=_HINT)  # fmt: skip
    blocks = tuple(math.ceil(n / b) for n, b in zip(info.shape, block, strict=True))
    if scale.shape != blocks or scale.dtype not in ("F32", "BF16"):
        raise FormatError(
            f"{name + SCALE} is {scale.dtype} {list(scale.shape)}; {list(info.shape)} in blocks of {list(block)} "
            f"needs a float per block, {list(blocks)}",
            path=ckpt.path,
            hint=_HINT,
        )
    return Stored(name, info.shape, "F8_E4M3", (name, name + SCALE))
