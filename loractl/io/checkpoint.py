"""Model checkpoints: one safetensors file or a sharded set with an index, read lazily.

Names, dtypes and shapes come from the headers alone; tensor data is fetched one tensor
at a time, so nothing here ever holds a whole model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from ..errors import FormatError, InputNotFoundError
from .read_pace import when_allowed
from .safetensors_header import DTYPE_SIZES, SafetensorsHeader, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

    from .safetensors_writer import FileRange

INDEX_NAME = "model.safetensors.index.json"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # a diffusers model's sharded weights
RECORD_NAME = "loractl_merge.json"  # the provenance a loractl merge writes beside the weights
SINGLE_NAME = "model.safetensors"
# Weight files that must not travel to a merge's output: they would hold the unmerged weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx", ".index.json")
# Bytes of a tensor read at a time where a base hashes it in row blocks: a buffer that stays in a core's L2 cache
# between the read's copy and the hash (16 MB: 1.4-1.6x the CPU per byte on machine C, bench/hash_block.py)
HASH_BLOCK = 1 << 20
READ_AHEAD = 1 << 24  # bytes beyond the chunk being hashed that the disk is asked for: a cold file streams
# The two definitions of a base fingerprint, told apart by their prefix (`fingerprint_of`):
STREAM = "sha256:"  # one SHA-256 over each tensor's (name, dtype, shape, bytes), in name order
PER_TENSOR = "sha256t:"  # one SHA-256 over each tensor's (name, dtype, shape, SHA-256 of its bytes), in name order


class Checkpoint:
    """A read-only view of a checkpoint; use as a context manager to close file handles."""

    quantized: frozenset[str] = frozenset()  # every tensor is read as stored (`bases.protocol.Weights`)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.headers: dict[Path, SafetensorsHeader] = {}
        self._where: dict[str, Path] = {}
        self._files: dict[Path, BinaryIO] = {}
        self._opening = threading.Lock()
        for shard in _shard_files(self.path):
            header = read_header(shard)
            self.headers[shard] = header
            for name in header.tensors:
                if name in self._where:
                    raise FormatError(f"tensor {name!r} appears in two shards", path=shard)
                self._where[name] = shard
        index = _index(self.path)
        if index is not None:
            _check_index(index, self._where)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def merge_record(self) -> Any:
        """The provenance a loractl merge wrote beside this checkpoint (`RECORD_NAME`); None without one
        or when it cannot be read (a damaged record is no evidence)."""
        from .values import load_json

        record = self.path / RECORD_NAME
        if not (self.path.is_dir() and record.is_file()):
            return None
        try:
            return load_json(record)
        except FormatError:
            return None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def names(self) -> list[str]:
        return list(self._where)

    @property
    def files(self) -> list[Path]:
        """The shards, in the order they were found."""
        return list(self.headers)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self.headers[self._where[name]].tensors[name]

    def view_info(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        """What a view of stored tensor `name` (some of its rows, as a fused projection's part) reports: its
        dtype, `shape` and that many bytes."""
        dtype = self.info(name).dtype
        return TensorInfo(dtype, shape, (0, math.prod(shape) * DTYPE_SIZES[dtype]))

    def shard_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (a fresh copy, never a view of the file)."""
        from .tensor_bytes import read_tensor

        shard = self._where[name]
        header, info = self.headers[shard], self.info(name)
        return read_tensor(self._file(shard), header.data_start + info.offsets[0], info.dtype, info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of one tensor (its first dimension), read into memory (a fresh copy)."""
        from .tensor_bytes import read_tensor

        shard, info, at, row_bytes = self._rows_at(name)
        return read_tensor(self._file(shard), at + start * row_bytes, info.dtype, (stop - start, *info.shape[1:]))

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start:stop of one tensor read into `out` (a uint8 buffer at least their size), as a view of it:
        positional reads, so any thread may call it, several at once (`bases.protocol.RowsInto`)."""
        from .tensor_bytes import torch_dtype

        shard, info, at, row_bytes = self._rows_at(name)
        view = out[: (stop - start) * row_bytes]
        read_at(self._file(shard).fileno(), memoryview(view.numpy()), at + start * row_bytes, shard)  # type: ignore[arg-type]
        return view.view(torch_dtype(info.dtype)).view(stop - start, *info.shape[1:])

    def _rows_at(self, name: str) -> tuple[Path, TensorInfo, int, int]:
        """Where one tensor's rows lie: its shard, its info, the file offset of its first byte, the bytes of a row
        (a 0-d tensor is one row)."""
        shard, info = self._where[name], self.info(name)
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
        return shard, info, self.headers[shard].data_start + info.offsets[0], row_bytes

    def file_range(self, name: str) -> FileRange:
        """Where the tensor's bytes lie, for a copy that never reads them into memory."""
        from .safetensors_writer import FileRange

        shard, info = self._where[name], self.info(name)
        return FileRange(shard, self.headers[shard].data_start + info.offsets[0], info.nbytes)

    def row_chunks(self, name: str, start: int, stop: int) -> Iterator[memoryview]:
        """The stored bytes of rows start:stop of one tensor, `HASH_BLOCK` bytes of rows at a time (what a base
        hashes a weight's rows by: never the whole weight in memory), each in the same buffer: valid until the
        next is asked for."""
        shard, _, at, row_bytes = self._rows_at(name)
        step, lead = (max(1, size // max(1, row_bytes)) for size in (HASH_BLOCK, READ_AHEAD))
        fd = self._file(shard).fileno()
        chunk = memoryview(bytearray(min(stop - start, step) * row_bytes))  # one buffer: no page faults per chunk
        asked = start  # rows up to here asked of the kernel: `READ_AHEAD` bytes beyond the chunk hashed
        for a in range(start, stop, step):
            b = min(stop, a + step)
            asked, c = max(asked, b), min(stop, b + lead)
            if c > asked:
                will_need(fd, at + asked * row_bytes, (c - asked) * row_bytes)
                asked = c
            read_at(fd, chunk[: (b - a) * row_bytes], at + a * row_bytes, shard)
            yield chunk[: (b - a) * row_bytes]

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's bytes exactly as stored (for fingerprints and bit-exact copies)."""
        shard = self._where[name]
        header, info = self.headers[shard], self.info(name)
        f = self._file(shard)
        f.seek(header.data_start + info.offsets[0])
        return f.read(info.nbytes)

    def fingerprint(
        self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False, scheme: str = STREAM
    ) -> str:
        """The named tensors' fingerprint by `scheme` (`fingerprint_of`).

        Remembered per file identity (`fingerprint_cache`): a second call on unchanged files hashes
        nothing; `fresh` hashes anyway (to confirm a mismatch). Read in chunks into one small buffer:
        hashing a 2 GB embedding costs 1 MB of memory. `stop` returning true between chunks abandons
        the hash (returns ''): a caller hashing on a thread beside its own work need not wait GBs of it
        after that work failed.
        """
        from .fingerprint_cache import remembered

        files = {self._where[n] for n in names}
        kind = cache_kind("safetensors", scheme)
        return remembered(kind, files, names, lambda: self._hash(names, stop, scheme), fresh=fresh)

    def _hash(self, names: list[str], stop: Callable[[], bool] | None, scheme: str) -> str:
        infos = {name: self.info(name) for name in hash_order(names, self.position, scheme)}
        rows = {name: info.shape[0] if info.shape else 1 for name, info in infos.items()}  # a 0-d tensor: one row
        return fingerprint_of(
            ((n, i.dtype, i.shape, when_allowed(n, partial(self.row_chunks, n, 0, rows[n]))) for n, i in infos.items()),
            stop,
            scheme,
        )

    def position(self, name: str) -> tuple[int, int]:
        """Where the tensor is stored: its shard's place among the files, its first byte's offset."""
        shard, _, at, _ = self._rows_at(name)
        return self.files.index(shard), at

    def fingerprint_views(self, names: list[str]) -> dict[str, str]:
        """The fingerprints the named tensors would have if stored in each of `VIEW_DTYPES` (see
        `FingerprintViews`); remembered as `fingerprint` is."""
        from .fingerprint_cache import remembered

        def compute() -> dict[str, str]:
            views = FingerprintViews()
            for name in sorted(names):
                views.feed(name, self.get(name))
            return views.digests()

        return remembered("safetensors-views", {self._where[n] for n in names}, names, compute)

    def config(self) -> dict[str, Any]:
        """The transformers `config.json` beside the weights ({} when absent or unreadable)."""
        from .config_json import read_config

        try:
            return read_config(self.path) or {}
        except FormatError:
            return {}

    def other_files(self) -> list[Path]:
        """Non-weight files beside the weights (config, tokenizer, ...), for copying along."""
        if not self.path.is_dir():
            return []
        weights = set(self.headers) | {self.path / INDEX_NAME, self.path / DIFFUSERS_INDEX_NAME}
        return sorted(p for p in self.path.iterdir() if p.is_file() and p not in weights and not p.name.startswith("."))

    def _file(self, shard: Path) -> BinaryIO:
        with self._opening:  # `read_rows_into` may be called from several threads: each shard opened once
            if shard not in self._files:
                self._files[shard] = shard.open("rb")
            return self._files[shard]


def read_at(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill `buf` with the bytes of `fd` (the file `path`) from `offset`: positional reads, safe on any thread
    (no shared file position); the GIL is released while the kernel copies."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise FormatError(f"unexpected end of file reading {len(buf)} bytes at offset {offset} (truncated?)",
                              path=path)  # fmt: skip
        done += n


def will_need(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start reading `nbytes` of `fd` from `offset` into the page cache now (a read ahead of
    the current one: the disk works while the caller computes); a no-op where that cannot be asked."""
    if nbytes > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)


def _shard_files(path: Path) -> list[Path]:
    InputNotFoundError.check(path, "checkpoint ")
    if path.is_file():
        return [path]
    index = _index(path)
    if index is not None:
        return _shards_from_index(index)
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise FormatError(
        f"no {SINGLE_NAME} or {INDEX_NAME} in the directory",
        path=path,
        hint="point at a safetensors checkpoint (loractl never unpickles .bin checkpoints)",
    )


def _index(path: Path) -> Path | None:
    """The shard index of a checkpoint directory: transformers' or diffusers' name."""
    found = [path / n for n in (INDEX_NAME, DIFFUSERS_INDEX_NAME)] if path.is_dir() else []
    return next((p for p in found if p.is_file()), None)


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"malformed index ({e.__class__.__name__}: {str(e)[:60]})", path=index) from None
    out = []
    for name in shards:
        shard = (index.parent / name).resolve()
        if not shard.is_relative_to(index.parent.resolve()):
            raise FormatError(f"shard {name!r} points outside the checkpoint directory", path=index)
        if not shard.is_file():
            raise FormatError(f"shard {name!r} listed in the index is missing", path=index)
        out.append(index.parent / name)
    return out


def _check_index(index: Path, where: dict[str, Path]) -> None:
    """The index must list exactly the tensors its shards hold, each in the right shard (as loaders trust it)."""
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, shard in weight_map.items():
        actual = where.get(name)
        if actual is None or actual.name != Path(str(shard)).name:
            found = f"it is in {actual.name}" if actual else "no shard holds it"
            raise FormatError(f"the index puts tensor {name!r} in {shard} but {found}", path=index)
    extra = sorted(set(where) - set(weight_map))
    if extra:
        raise FormatError(
            f"{len(extra)} tensors in the shards are missing from the index (e.g. {extra[0]!r})", path=index
        )


def fingerprint_of(
    tensors: Iterable[tuple[str, str, tuple[int, ...], Callable[[], bytes | Iterable[bytes | memoryview]]]],
    stop: Callable[[], bool] | None = None,
    scheme: str = STREAM,
) -> str:
    """A base fingerprint over (name, dtype code, shape, bytes read on demand: whole, or in chunks, which hash the
    same); '' once `stop` returns true (asked before each tensor and each chunk).

    `STREAM` hashes the tensors as one stream and needs them in name order; `PER_TENSOR` hashes each tensor on its
    own and then their digests in name order, so the tensors may come in any order: a base hashes them in the
    order it stores them, paced behind a merge reading the same bytes (`read_pace`), so the disk serves them once.
    A record's prefix says which it is (`scheme_of`).
    """
    whole, lines = hashlib.sha256(), {}
    for name, dtype, shape, read in tensors:
        if stop is not None and stop():
            return ""
        raw = read()
        chunks = [raw] if isinstance(raw, bytes | bytearray | memoryview) else raw
        h = whole if scheme == STREAM else hashlib.sha256()
        if scheme == STREAM:
            feed_fingerprint(h, name, TensorInfo(dtype, shape, (0, math.prod(shape) * DTYPE_SIZES[dtype])), b"")
        for chunk in chunks:
            if stop is not None and stop():
                return ""
            h.update(chunk)
        if scheme == PER_TENSOR:
            lines[name] = json.dumps([name, dtype, list(shape), h.hexdigest()]) + "\n"  # any name: JSON-quoted
    if scheme == STREAM:
        return STREAM + whole.hexdigest()
    return PER_TENSOR + hashlib.sha256("".join(lines[n] for n in sorted(lines)).encode()).hexdigest()


class RowSource(Protocol):
    """A weight stored as some rows of a stored tensor (a fused projection's part), or all of it."""

    @property
    def key(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]:  # the weight's own
        ...

    @property
    def rows(self) -> tuple[int, int] | None: ...


def fingerprint_of_rows(
    ckpt: Checkpoint, sources: Sequence[tuple[str, RowSource]], read: Callable[[Any], Iterable[memoryview]],
    stop: Callable[[], bool] | None, scheme: str,
) -> str:  # fmt: skip
    """`fingerprint_of` the weights `sources` names (name, where `ckpt` stores it), each read by `read` (a base's
    own: it may turn the rows); a `PER_TENSOR` one in the order `ckpt` stores them."""
    src = dict(sources)

    def position(name: str) -> tuple[int, int, int]:
        rows = src[name].rows
        return *ckpt.position(src[name].key), rows[0] if rows else 0

    order = hash_order(src, position, scheme)
    items = [(n, ckpt.info(src[n].key).dtype, src[n].shape, when_allowed(src[n].key, partial(read, src[n])))
             for n in order]  # fmt: skip
    return fingerprint_of(items, stop, scheme)


def scheme_of(fingerprint: str) -> str:
    """The definition a recorded fingerprint was taken by, from its prefix (anything else is read as `STREAM`'s
    and then matches nothing)."""
    return PER_TENSOR if fingerprint.startswith(PER_TENSOR) else STREAM


def hash_order(names: Iterable[str], position: Callable[[str], Any], scheme: str) -> list[str]:
    """The order to hash `names` in: by name for `STREAM`, by where they are stored for `PER_TENSOR`."""
    return sorted(names) if scheme == STREAM else sorted(names, key=position)


def cache_kind(kind: str, scheme: str) -> str:
    """`fingerprint_cache`'s kind of a fingerprint taken by `scheme` (`STREAM`'s keeps its old keys)."""
    return kind if scheme == STREAM else f"{kind} {scheme}"


def feed_fingerprint(h: Any, name: str, info: TensorInfo, data: bytes | memoryview) -> None:
    """Add one tensor to a fingerprint hash; callers that read tensors anyway hash them in the same pass."""
    h.update(f"{name}:{info.dtype}:{list(info.shape)}:".encode())
    h.update(data)


VIEW_DTYPES = ("BF16", "F16")  # the dtypes a copy of a base is commonly cast down to


class FingerprintViews:
    """Fingerprints of tensors as they would be if cast to bf16 and fp16, hashed as `Checkpoint.fingerprint` does.

    A copy cast down with round-to-nearest has exactly the bytes of the original's view, and a copy cast
    up has a view equal to the original: so one exact comparison either way recognises the same
    weights in another floating dtype, while any changed weight still changes the hash.
    """

    def __init__(self) -> None:
        self._hashes = {code: hashlib.sha256() for code in VIEW_DTYPES}

    def feed(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        from .tensor_bytes import dtype_code, torch_dtype

        for code, h in self._hashes.items():
            t = tensor.to(torch_dtype(code)) if tensor.is_floating_point() else tensor
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            feed_fingerprint(h, name, TensorInfo(dtype_code(t.dtype), tuple(t.shape), (0, len(raw))), raw)

    def digests(self) -> dict[str, str]:
        return {code: "sha256:" + h.hexdigest() for code, h in self._hashes.items()}


def same_base(
    recorded: str, recorded_views: dict[str, str], actual: str, actual_views: Callable[[], dict[str, str]]
) -> bool:
    """Whether a recorded base fingerprint is this base's, in its own or another floating dtype.

    Equal fingerprints; or this base's bytes equal a recorded view (this base is a cast-down copy);
    or a view of this base equals the recorded fingerprint (it is a cast-up copy). `actual_views`
    is called only when the plain fingerprints differ (it reads and casts every tensor).
    """
    if recorded == actual or actual in recorded_views.values():
        return True
    return recorded in actual_views().values()


def other_base(ckpt: Checkpoint, modules: Iterable[str], recorded: str, recorded_views: dict[str, str]) -> str | None:
    """This base's fingerprint over the weights `modules` adapt when it is not the `recorded` base's
    (in any floating dtype, `same_base`); None when it is."""
    names = touched_weight_names(modules, ckpt)
    actual = ckpt.fingerprint(names, scheme=scheme_of(recorded))
    return None if same_base(recorded, recorded_views, actual, lambda: ckpt.fingerprint_views(names)) else actual


def touched_weight_names(modules: Iterable[str], ckpt: Container[str]) -> list[str]:
    """The base tensors an adapter's modules apply to (`<module>.weight`), as far as the base has them.

    This set defines the base fingerprint, so merge, extract, train and validate agree on it.
    """
    return sorted(f"{m}.weight" for m in modules if f"{m}.weight" in ckpt)
