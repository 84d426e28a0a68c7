"""The merge arithmetic: W' = W + Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ in float32, one block of rows at a time.

Every update is written as a product `factor · left @ right` in the layout the base stores the
weight in, so one loop serves linear, Conv1D (`fan_in_fan_out`), conv and embedding weights:

    linear      left = B (out, r)         right = A (r, in)
    conv        left = B (out, r)         right = A (r, in·k…)     the weight viewed as (out, in·k…)
    Conv1D/emb  left = Aᵀ (in|vocab, r)   right = Bᵀ (r, out|dim)   the stored weight is transposed

A float32 buffer of a few MB holds one block of rows: the weight never exists in float32 as a
whole, and each block is converted, updated in place and cast back while it is in cache.
The blocks can run on an accelerator (`device`); the bytes written are those of the CPU merge
wherever float32 `addmm` rounds as the CPU's does (TF32 stays off: torch's default for matmul).

The float32 arithmetic is PEFT's, operation for operation, so a bf16 merge is bit-identical to
`merge_and_unload`: ΔW = (B @ A) rounded, times the scale rounded, added to W rounded, then the
cast. Two details make that hold for row blocks: MKL's sgemm takes another kernel for products
of fewer than 4 rows, whose float32 sums round differently from those of the whole product
(`MIN_ROWS`), and a scale folded into `addmm_`'s alpha skips one rounding unless it is a power
of two (`_exact_alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import Any

import torch

from ..adapter import LoraModule
from .linalg import factored_frobenius

BLOCK_ELEMENTS = 1 << 20  # float32 elements per row block (4 MB)
MIN_ROWS = 4  # rows per block at least: below 4, MKL's sgemm rounds its sums otherwise than for the whole ΔW
THREADS = 1  # torch intra-op threads while merging; see `kernel_threads`
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@dataclass(frozen=True)
class Delta:
    """One update ΔW = factor · left @ right, in the stored layout of the weight it applies to.

    `magnitude` makes it a DoRA update (W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output feature);
    `per_column` says the output features are the stored columns (Conv1D, embeddings).
    """

    left: torch.Tensor  # (rows, rank) float32
    right: torch.Tensor  # (rank, cols) float32
    factor: float
    magnitude: torch.Tensor | None = None  # (out,) float32
    per_column: bool = False


@contextmanager
def kernel_threads() -> Iterator[None]:
    """Run the merge with `THREADS` torch threads, restoring the caller's setting after.

    The work is memory-bound conversions and rank-r updates of a few MB each: extra intra-op
    threads add little, and where other processes share the cores, OpenMP barrier waits make
    them far slower (a 0.6 GB merge on 2 busy cores: 5.7 s with one thread, 17–18 s with two).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@cache
def steady_heap() -> None:
    """Have glibc map (and unmap) every allocation of a block's size or more, for the rest of the process.

    glibc's malloc serves allocations from 128 KB up by mmap at first, but raises that threshold after each
    large free, up to 32 MiB: a merge of row blocks then takes its block-sized temporaries (float32 blocks,
    a requantizer's) from the heap, whose fragmentation grew with the tensor. Merging one 32768 × 4096 FP8
    weight peaked at 282–506 MB from run to run; with the threshold fixed at a block's 4 MB, at 281–284 MB.
    Elsewhere than glibc nothing changes.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, BLOCK_ELEMENTS * 4)


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's `malloc_trim`): an adapter's factors freed module by
    module as a merge goes lie between allocations still in use, and stay resident (counted in RSS) otherwise.
    Merging Flux.1-dev: RSS grew by ~130 MiB over the run without it, and shrinks with it. Elsewhere a no-op."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _glibc() -> Any:
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and others: neither
        return None


def module_delta(module: LoraModule, weight: float) -> Delta:
    """The update `weight · module` applies to its base weight."""
    a, b = module.A.float(), module.B.float()
    transposed = module.kind == "embedding" or module.fan_in_fan_out
    if module.kind == "conv":
        left, right = b.flatten(1), a.flatten(1)
    elif transposed:
        left, right = a.T.contiguous(), b.T.contiguous()
    else:
        left, right = b, a
    magnitude = None if module.magnitude is None else module.magnitude.float().reshape(-1)
    return Delta(left, right, weight * module.scale, magnitude, transposed)


def bias_delta(module: LoraModule, weight: float) -> Delta:
    """lora_B.bias as a rank-1 update of the base bias viewed as (out, 1): b' = b + w·scale·bias."""
    assert module.bias is not None
    return Delta(module.bias.float().reshape(-1, 1), torch.ones(1, 1), weight * module.scale)


@dataclass
class BlockStats:
    """Figures a merge gathers from its float32 blocks while they are in cache (all float64 sums).

    `weight_sq` is ‖W‖²_F, `rounding_sq` ‖round(W') − W'‖²_F (rounding into the output dtype),
    `change_sq` ‖W' − W‖²_F measured (DoRA only: its change is not a low-rank product).
    """

    weight_sq: float = 0.0
    rounding_sq: float = 0.0
    change_sq: float = 0.0
    finite: bool = True


Rows = Callable[[int, int], torch.Tensor]
"""Rows start:stop of the starting weight viewed as (rows, cols), in any dtype, on the CPU."""
OutBlock = Callable[[int], tuple[torch.Tensor, "torch.Tensor | None"]]
"""A writable CPU byte buffer of at least n bytes, and its owner for the write queue."""


def merged_blocks(
    rows_of: Rows,
    shape: tuple[int, int],
    deltas: Sequence[Delta],
    out_dtype: torch.dtype,
    out_block: OutBlock,
    stats: BlockStats,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield W + every delta, in order, as blocks of rows in `out_dtype`, filling `stats` on the way.

    Each block is converted to float32 (on `device`), updated in place (`addmm_`) and cast back while
    it is in cache, so neither the weight in float32 nor any buffer of the tensor's size exists:
    whatever the tensor, memory is a few blocks. DoRA norms are taken of the starting weight plus that
    adapter's own ΔW, as PEFT's merge does; a DoRA update normalising stored columns needs every row
    at once, so then the block is the whole tensor. ‖W‖_F, the rounding loss and the finite check come
    from the blocks: float32 norms of single rows (exact to float32 rounding; one float32 reduction
    over a whole weight is off by up to 1%, PERF.md) summed in float64.
    """
    rows, cols = shape
    itemsize = torch.empty(0, dtype=out_dtype).element_size()
    if not deltas:  # a plain cast (or --dtype copy): straight into the output, on the CPU
        step = max(1, min(rows, BLOCK_ELEMENTS // max(cols, 1)))
        for start in range(0, rows, step):
            src = rows_of(start, min(start + step, rows))
            raw, owner = out_block(src.numel() * itemsize)
            out = raw[: src.numel() * itemsize].view(out_dtype).view(src.shape).copy_(src)
            stats.finite = stats.finite and all_finite(out)
            yield out, owner
        return
    device = device or torch.device("cpu")
    dora = [d for d in deltas if d.magnitude is not None]
    bounds = [0, rows] if any(d.per_column for d in dora) else block_bounds(rows, cols)
    on_device = [_to(d, device) for d in deltas]
    block = max(b - a for a, b in pairwise(bounds))
    buf = torch.empty(block, cols, dtype=torch.float32, device=device)
    start_buf = torch.empty_like(buf) if dora else None
    rounds = itemsize < 4  # bf16/f16 outputs lose bits
    back_buf = torch.empty_like(buf) if rounds and start_buf is None else buf
    scratch = None if all(_exact_alpha(d) for d in deltas) else torch.empty_like(buf)
    for start, stop in pairwise(bounds):
        cur = buf[: stop - start]
        cur.copy_(rows_of(start, stop))
        stats.weight_sq += rows_sq(cur)
        first = None if start_buf is None else start_buf[: stop - start].copy_(cur)
        for d in on_device:
            _apply(cur, first, d, start, stop, None if scratch is None else scratch[: stop - start])
        nbytes = cur.numel() * itemsize
        raw, owner = out_block(nbytes)
        out = raw[:nbytes].view(out_dtype).view(cur.shape)
        rounded = out.copy_(cur) if device.type == "cpu" else cur.to(out_dtype)
        if first is not None:
            stats.change_sq += rows_sq(first.sub_(cur).neg_())
        if rounds:  # the norm of cur − round(cur) is finite exactly when both are: it is the finite check
            back = (start_buf if start_buf is not None else back_buf)[: stop - start].copy_(rounded)
            lost = rows_sq(cur.sub_(back))  # float32 − float32: 3× faster than subtracting the bf16 block
            stats.finite = stats.finite and math.isfinite(lost)
            stats.rounding_sq += lost
        else:
            stats.finite = stats.finite and all_finite(rounded)
        if device.type != "cpu":
            out.copy_(rounded)
        yield out, owner


def block_bounds(rows: int, cols: int, elements: int | None = None) -> list[int]:
    """Where the row blocks of a (rows, cols) weight start, then `rows`: at most `elements` (`BLOCK_ELEMENTS`) each,
    balanced (sizes differ by one row at most) so that none has fewer than `MIN_ROWS` rows (a weight
    of fewer rows is one block, as PEFT's product is)."""
    step = max(MIN_ROWS, (elements or BLOCK_ELEMENTS) // max(cols, 1))
    count = max(1, min(-(-rows // step), rows // MIN_ROWS))
    return [i * rows // count for i in range(count + 1)]


def aligned_bounds(
    rows: int, cols: int, multiple: int = 1, whole: bool = False, elements: int | None = None
) -> list[int]:
    """`block_bounds` for a base that stores rows in groups of `multiple` (FP8's 128-row scale blocks, a
    4-bit block of 64 values spanning rows): every bound but the last a multiple of it, no block under
    `MIN_ROWS` rows. `whole`: one block (a DoRA update normalising stored columns needs every row)."""
    if whole or rows <= MIN_ROWS:
        return [0, rows]
    bounds = block_bounds(rows, cols, elements)
    if multiple > 1:
        bounds = sorted({0, *(b // multiple * multiple for b in bounds[1:-1]), rows})
    kept = [0]
    for b in bounds[1:-1]:
        if b - kept[-1] >= MIN_ROWS and rows - b >= MIN_ROWS:
            kept.append(b)
    return [*kept, rows]


def merge_rows(
    block: torch.Tensor, deltas: Sequence[Delta], start: int, device: torch.device | None = None
) -> torch.Tensor:
    """Rows `start`… of W + every delta, from `block` (those rows of W, any float dtype), as float32 of its
    shape (`block` itself, updated in place, when it is float32 on the CPU and `device` is the CPU):
    `merged_blocks`' float32 operations on one block of rows, for bases that read and store a tensor a
    block of rows at a time. A row's sums do not depend on the rows beside it in blocks of `MIN_ROWS` or
    more, so the result is bit-identical to merging the whole tensor. `deltas` already on `device`."""
    device = device or torch.device("cpu")
    rows = block.shape[0] if block.ndim else 1
    flat = block.reshape(rows, -1)
    in_place = device.type == "cpu" and flat.dtype == torch.float32 and flat.data_ptr() == block.data_ptr()
    cur = flat if in_place else flat.to(device=device, dtype=torch.float32, copy=True)
    first = cur.clone() if any(d.magnitude is not None for d in deltas) else None
    scratch = None if all(_exact_alpha(d) for d in deltas) else torch.empty_like(cur)
    for d in deltas:
        _apply(cur, first, d, start, start + rows, scratch)
    return cur.cpu().view(block.shape)


def on_device(deltas: Sequence[Delta], device: torch.device) -> list[Delta]:
    return [_to(d, device) for d in deltas]


def merged_float32(
    weight: torch.Tensor, deltas: Sequence[Delta], device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """W + every delta as one float32 tensor of `weight`'s shape, and ‖W‖_F: `merged_blocks` (on `device`) for
    callers that hold the whole tensor anyway (convert's loss measure, GGUF and single-file SD merges)."""
    rows = weight.shape[0] if weight.ndim else 1
    src = weight.reshape(rows, -1)
    out = torch.empty(src.shape, dtype=torch.float32)
    raw, offset = out.view(-1).view(torch.uint8), 0

    def into_out(nbytes: int) -> tuple[torch.Tensor, None]:
        nonlocal offset
        offset += nbytes
        return raw[offset - nbytes : offset], None

    stats = BlockStats()
    for _ in merged_blocks(lambda a, b: src[a:b], (rows, src.shape[1]), deltas, torch.float32, into_out, stats, device):
        pass
    return out.view(weight.shape), math.sqrt(stats.weight_sq)


def rows_sq(block: torch.Tensor) -> float:
    """Σ of squared row norms: float32 rows (exact to ~1e-7 each), summed in float64."""
    return sum_sq(torch.linalg.vector_norm(block, dim=1).cpu())


def sum_sq(norms: torch.Tensor) -> float:
    """Σ of squared float32 row norms, in float64: `rows_sq`'s sum, of norms taken a few rows at a time."""
    return float(norms.double().square().sum())


def _to(d: Delta, device: torch.device) -> Delta:
    if device.type == "cpu":
        return d
    m = None if d.magnitude is None else d.magnitude.to(device)
    return Delta(d.left.to(device), d.right.to(device), d.factor, m, d.per_column)


def _exact_alpha(d: Delta) -> bool:
    """Whether `addmm_(alpha=factor)` rounds as PEFT's `W + (B @ A) * scale`: when factor·(B @ A) is
    exact, a power of two (1 included), or a DoRA update (it is not an `addmm_`)."""
    return d.magnitude is not None or math.frexp(d.factor)[0] in (0.5, -0.5)


def _apply(
    cur: torch.Tensor, first: torch.Tensor | None, d: Delta, start: int, stop: int, scratch: torch.Tensor | None
) -> None:
    left = d.left[start:stop]
    if d.magnitude is None:
        if scratch is None or _exact_alpha(d):
            cur.addmm_(left, d.right, alpha=d.factor)
        else:  # PEFT's order: the product rounded, then scaled and rounded, then added
            cur.add_(torch.mm(left, d.right, out=scratch).mul_(d.factor))
        return
    assert first is not None
    delta = torch.mm(left, d.right).mul_(d.factor)
    norm = torch.linalg.vector_norm(first + delta, dim=0 if d.per_column else 1)
    factor = d.magnitude / norm if d.per_column else d.magnitude[start:stop] / norm
    cur.add_(delta).mul_(factor.view(1, -1) if d.per_column else factor.view(-1, 1))


def deltas_norm(deltas: Sequence[Delta]) -> float:
    """‖Σ factorᵢ · leftᵢ @ rightᵢ‖_F of low-rank updates: `linalg.factored_frobenius` of the stacked factors."""
    if not deltas:
        return 0.0
    left = torch.cat([d.left.double() * d.factor for d in deltas], dim=1)
    right = torch.cat([d.right.double() for d in deltas], dim=0)
    return factored_frobenius(left, right)


def all_finite(t: torch.Tensor) -> bool:
    """True unless a floating-point tensor holds NaN or ±Inf.

    A sum is finite whenever every element is (it propagates NaN and Inf) and costs one fast pass;
    only a non-finite sum, which an overflow can also cause, is checked element by element.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype not in _NATIVE:  # float8: no isfinite kernel
        return all(bool(torch.isfinite(c.float()).all()) for c in torch.split(t.reshape(-1), BLOCK_ELEMENTS))
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


_NATIVE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
