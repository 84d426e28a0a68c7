"""bitsandbytes' 4-bit quantization of a weight, row block by row block: the same bytes, bounded temporaries.

bitsandbytes' CPU quantizer works on the whole matrix in float32: the weight upcast, its scaled and clamped
copies and int32 bucket ids, about 16 bytes per weight (0.7 GB for one 11008 × 4096 MLP matrix of a 7 B
Llama), on top of everything already loaded. It quantizes blocks of `blocksize` consecutive weights
independently (each block its own absmax), so when the row length is a multiple of the blocksize no block
straddles two rows, and quantizing rows [i, j) gives exactly those rows' packed bytes and absmax values.
Double quantization (`compress_statistics`) quantizes the absmax vector again, offset by its mean: that
stage needs the whole vector, so it runs once over the concatenated absmax, as bitsandbytes runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

# Weights quantized at once: each float32 temporary is then 32 MiB, glibc's largest mmap threshold, so it is
# mapped and returned whole; with 4 M weights (16 MiB) freed temporaries stayed in the heap, fragmented, and
# the process's RSS grew to twice the memory it used (tests/test_train_quantize_rows.py).
ROW_BLOCK_WEIGHTS = 1 << 23


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
    *,
    whole: Callable[..., tuple[torch.Tensor, Any]] | None = None,
) -> tuple[torch.Tensor, Any]:
    """`bitsandbytes.functional.quantize_4bit` (same signature, same bytes), a block of rows at a time.

    A matrix whose rows do not split into whole quantization blocks, one that fits one row block, a
    non-CPU tensor (bitsandbytes' GPU kernels allocate no float32 copy) or the deprecated `absmax` /
    `out` arguments go to bitsandbytes whole. `whole`: bitsandbytes' own function (looked up when None).
    """
    from bitsandbytes import functional

    whole = whole or functional.quantize_4bit
    blocksize = blocksize or 64
    rows = _rows_per_block(A, blocksize)
    if not rows or absmax is not None or out is not None:
        return whole(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)
    packed, scales = [], []
    for start in range(0, A.shape[0], rows):
        block, state = whole(A[start : start + rows], blocksize=blocksize, quant_type=quant_type,
                             quant_storage=quant_storage)  # fmt: skip
        packed.append(block)
        scales.append(state.absmax)
    every = torch.cat(scales)
    common = {"shape": A.shape, "dtype": A.dtype, "blocksize": blocksize, "quant_type": quant_type,
              "code": functional.get_4bit_type(quant_type, device=A.device)}  # type: ignore[no-untyped-call]  # fmt: skip
    if not compress_statistics:
        return torch.cat(packed), functional.QuantState(absmax=every, **common)  # type: ignore[no-untyped-call]
    offset = every.mean()
    nested, state2 = functional.quantize_blockwise(every - offset, blocksize=256)
    return torch.cat(packed), functional.QuantState(  # type: ignore[no-untyped-call]
        absmax=nested, offset=offset, state2=state2, **common
    )


def _rows_per_block(A: torch.Tensor, blocksize: int) -> int:
    """Rows quantized at once; 0 where the matrix goes to bitsandbytes whole (see `quantize_4bit`)."""
    if A.dim() != 2 or A.device.type != "cpu" or not A.shape[1] or A.shape[1] % blocksize:
        return 0
    rows = max(1, ROW_BLOCK_WEIGHTS // A.shape[1])
    return rows if rows < A.shape[0] else 0


@contextmanager
def row_block_quantization() -> Iterator[None]:
    """While loading: bitsandbytes' `Params4bit` quantizes each weight through `quantize_4bit` above.

    `Params4bit` calls `bitsandbytes.functional.quantize_4bit` when transformers moves a freshly read
    weight to its device; bitsandbytes offers no other way in (its per-device kernels are anonymous),
    so the function is swapped for the load and restored after.
    """
    from bitsandbytes import functional

    original = functional.quantize_4bit
    functional.quantize_4bit = partial(quantize_4bit, whole=original)
    try:
        yield
    finally:
        functional.quantize_4bit = original
