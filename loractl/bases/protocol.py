"""The interface every kind of base offers (see `loractl.bases` for the kinds and their detection)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ..io.checkpoint import STREAM

if TYPE_CHECKING:
    import torch

    from ..findings import Finding
    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from ..io.safetensors_header import TensorInfo
    from ._placement import Placement


@dataclass(frozen=True)
class BaseTensor:
    """One stored tensor, from the header: its shape as Hugging Face orders it and its stored type."""

    name: str
    shape: tuple[int, ...]
    stored_type: str  # a safetensors dtype code (F32, BF16, …) or a GGML type name (Q8_0, …)
    quantized: bool = False  # block-quantized: storing a value moves its block's other values too
    converted: bool = False  # written converted (dequantized, cast) even where no adapter touches it


@dataclass(frozen=True)
class OutputChoices:
    """What `merge` asks of a rewritten base's output beyond the merge (`--dtype`, `--keep-quant`,
    `--max-shard-size`); only the kinds whose module sets `TAKES_OUTPUT_CHOICES` take a dtype or a size."""

    dtype: str | None = None  # a safetensors float code: write every floating tensor so, dequantized
    keep_quant: bool = False  # requantize merged weights in the base's own scheme and keep its config
    max_shard_bytes: int | None = None


T = TypeVar("T")
RowsOf = Callable[[int, int], "torch.Tensor"]
"""Rows start:stop of a stored tensor (its first dimension), as float32 or any float dtype."""
RowsInto = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]
"""`RowsOf` read into a uint8 buffer at least their size (the result a view of it): positional reads, so
that any thread may call it, several at once."""


@dataclass(frozen=True)
class CastRows(Generic[T]):
    """How a base whose rows read positionally and whose store is a plain cast into a buffer of its own (thread-safe:
    `_rewrite`'s, into a write queue's buffer) lets the merge read and store on its own threads (`TensorSink.blocks`):
    `read` rows start:stop, and `target(start, numel)`: where the block from row `start` goes, a flat tensor of
    the stored float dtype (`numel` values) the merge casts W + ΔW into, and what to yield for the block (what the
    output gets)."""

    read: RowsInto
    target: Callable[[int, int], tuple[T, torch.Tensor]]


class TensorSink(Protocol):
    """The merge, as a base writing itself calls it for each tensor that changes: a block of rows at a time,
    so that memory is a few blocks whatever the tensor's size."""

    @property
    def block_elements(self) -> int:
        """The most values a block holds (bar one of whole rows wider than that): what a writer's buffers take."""
        ...

    @property
    def blocks_in_flight(self) -> int:
        """The most blocks `store` has filled that are not yet yielded: a writer whose `store` takes buffers from a
        pool needs more buffers than that, or the oldest block waits for one forever."""
        ...

    def blocks(
        self,
        name: str,
        rows_of: RowsOf,
        store: Callable[[int, torch.Tensor], tuple[T, torch.Tensor]],
        multiple: int = 1,
        into: CastRows[T] | None = None,
    ) -> Iterator[T]:
        """Tensor `name` merged block by block, in row order: for each block start:stop (every bound but the
        last a multiple of `multiple`: the rows the stored type quantizes together), W's rows from
        `rows_of(start, stop)`, W + ΔW (float32) handed to `store(start, merged)`, which answers what the
        output gets (yielded: bytes, a tensor) and what that holds, read back as float32.

        `into` (`CastRows`), from a base whose rows read positionally and whose store is a plain cast into a
        buffer of its own: the sink may then read each block with `into.read` into a buffer it reuses and cast it
        into `into.target` on its own threads, several blocks at once; what it yields is still in row order.
        Otherwise `rows_of` and `store` are called on the caller's thread only."""
        ...


class Weights(Protocol):
    """A base read as the Hugging Face checkpoint it holds, tensor by tensor (what `extract` compares):
    `io.checkpoint.Checkpoint` is one; a GGUF model maps its names and rows back (`gguf.GgufWeights`)."""

    path: Path

    @property
    def files(self) -> list[Path]:
        """What the tensors are read from (the fingerprint cache's key)."""
        ...

    @property
    def quantized(self) -> frozenset[str]:
        """The tensors `get` dequantizes: no stored float bytes for a fingerprint to cover."""
        ...

    @property
    def names(self) -> list[str]: ...

    def __contains__(self, name: object) -> bool: ...

    def info(self, name: str) -> TensorInfo:
        """The tensor's dtype (a safetensors code: what `get` returns) and shape, from the header."""
        ...

    def get(self, name: str) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...

    def fingerprint(
        self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False, scheme: str = STREAM
    ) -> str:
        """`Checkpoint.fingerprint` of the named tensors ('' when the stored values cannot say)."""
        ...

    def merge_record(self) -> Any:
        """The provenance loractl wrote when this checkpoint was a merge's output (None otherwise or unreadable):
        per adapter its `base_fingerprint`, and `modules` as `{"adapter": i, "module": name}`."""
        ...


class Base(Protocol):
    """A base a LoRA can be merged into, as read (see the module docstring)."""

    path: Path

    @property
    def kind(self) -> str:
        """What the report calls it: "gguf llama", "sd1", "sdxl", …"""
        ...

    def tensors(self) -> dict[str, BaseTensor]: ...

    def read_options(self, fmt: str, options: ReadOptions) -> ReadOptions:
        """How to read an adapter of format `fmt` merged into this base."""
        ...

    def place(self, module: str, m: ModuleInfo, adapter: AdapterInfo) -> Placement | tuple[Placement, ...] | Finding:
        """Where the module's ΔW lands: one stored tensor, or several (each taking its `part` of ΔW's rows)."""
        ...

    def read_float32(self, name: str) -> torch.Tensor: ...

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False,
        scheme: str = STREAM,
    ) -> str | None:  # fmt: skip
        """The fingerprint of the weights `modules` apply to, in the adapter's terms (`<module>.weight`
        as a Hugging Face checkpoint stores it) by `scheme` (`io.checkpoint.fingerprint_of`); None when the
        stored values cannot say (quantized). Remembered per file identity (`io.fingerprint_cache`); `fresh`
        hashes again."""
        ...

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        """The same fingerprint with the weights cast to bf16 and fp16 (`io.checkpoint.FingerprintViews`)."""
        ...

    def weights(self) -> Weights:
        """The tensors in Hugging Face's names, order and dtypes (quantized ones as float32), for `extract`."""
        ...

    def close(self) -> None:
        """Release the files (callers use `contextlib.closing`)."""
        ...


class RewritableBase(Base, Protocol):
    """A base merged by rewriting it in its own storage, tensor for tensor (GGUF, single-file SD).

    A Hugging Face checkpoint is not one of them: its merge streams row blocks into new shards
    (`ops/merge.py`), may change the dtype, and writes provenance as a file beside the weights.
    """

    def write(self, tmp: Path, provenance: dict[str, Any], names: Iterable[str], sink: TensorSink) -> None:
        """The base at `tmp` with loractl's `provenance` in its metadata, the tensors `names` merged by `sink`."""
        ...
