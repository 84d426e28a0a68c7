"""A llama.cpp GGUF *model* file as a base: its tensors, their types, and where each module lands.

Module paths map to GGUF names with gguf-py's own name map (`names`), as for GGUF adapters;
q/k weights of Llama-family architectures hold their rows in Meta's RoPE order (`rope.py`), so a
ΔW is permuted the way llama.cpp's converter permuted the base. A tensor is rewritten in its own
type: by gguf-py where it can both dequantize and quantize it (F32, F16, BF16, Q8_0, Q4_0/1,
Q5_0/1, … — probed, not listed), by llama.cpp's own quantizer otherwise (`ggml_quant`: K-quants,
IQ types; those that need an importance matrix take `--imatrix`, `gguf_imatrix`, which then
requantizes every tensor it covers, as `llama-quantize --imatrix` does). The output keeps every
tensor info and byte of the base; loractl's provenance is one more KV entry (`loractl.merge`),
which llama.cpp ignores. A split model (llama.cpp's `gguf-split`: `NAME-00001-of-00003.gguf`, the
metadata in the first shard, `split.*` entries in each) is read from its first shard and written
back split the same way, shard for shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from ..findings import Finding, error
from ..formats._rope import RopeHeads, is_rope_module
from ..formats.gguf import names as gguf_names
from ..io.checkpoint import STREAM, cache_kind
from . import ggml_quant
from ._placement import Placement
from .gguf_header import GgufHeader, TensorEntry, read_header, read_range
from .protocol import BaseTensor, TensorSink, Weights

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from ..io.safetensors_header import TensorInfo


RECORD_KEY = "loractl.merge"  # the KV entry that holds loractl's provenance in a merged model
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})  # stored as safetensors stores them: the fingerprint can be taken
GENERATED = "rope_"  # rope_freqs, rope_factors_*: computed from the config by llama.cpp's converter, in no checkpoint
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # llama.cpp's llama_split_path


def detect(path: Path) -> bool:
    """A file with the GGUF magic (model or adapter: `GgufBase` refuses adapters with a hint)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def open(path: Path) -> GgufBase:
    return GgufBase(path)


class GgufBase:
    """The parsed header of a GGUF model file (`gguf_header`); tensor data is read a block of rows at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        fields = _fields(self.header)
        if fields.get("general.type", "model") != "model":
            raise FormatError(
                f"GGUF file of type {fields['general.type']!r}, not a model",
                path=path,
                hint="a merge base and both checkpoints of extract are GGUF models; a GGUF LoRA adapter is "
                "an ADAPTER (loractl merge BASE ADAPTER)",
            )
        self.fields = fields
        self.arch = str(fields.get("general.architecture", ""))
        self.paths, self.headers = _shards(self.path, self.header, fields)
        self.tensors_by_name: dict[str, TensorEntry] = {t.name: t for h in self.headers for t in h.tensors}
        self.shard_of = {t.name: i for i, h in enumerate(self.headers) for t in h.tensors}
        self.importance: dict[str, np.ndarray[Any, Any]] = {}  # --imatrix: column weights per tensor
        self.imatrix_path: Path | None = None
        self.tmap = gguf_names.name_map(self.arch, self.block_count)
        self.heads = self._heads()
        self._config_dir: Path | None = None

    @property
    def kind(self) -> str:
        return f"gguf {self.arch}"

    def tensors(self) -> dict[str, BaseTensor]:
        return {k: BaseTensor(k, self.shape(k), self.type_name(k), self.type_name(k) not in FLOAT_TYPES)
                for k in self.tensors_by_name}  # fmt: skip

    def close(self) -> None:
        """Remove the config directory `read_options` made (tensor bytes are read with pread: no map to release)."""
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    @property
    def block_count(self) -> int:
        return int(self.fields.get(f"{self.arch}.block_count") or 1)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape in numpy (row-major) order, as Hugging Face stores the weight."""
        return self.tensors_by_name[key].shape

    def type_name(self, key: str) -> str:
        return self.tensors_by_name[key].type_name

    def config(self) -> dict[str, Any]:
        """The head and layer counts as a Hugging Face config.json has them (for reading GGUF adapters)."""
        out: dict[str, Any] = {"num_hidden_layers": self.block_count}
        if self.heads:
            out |= {"num_attention_heads": self.heads.n_heads, "num_key_value_heads": self.heads.n_kv_heads}
        return out

    def read_options(self, fmt: str, options: ReadOptions) -> ReadOptions:
        """A GGUF adapter gets this model's head and layer counts (as a config.json in a temporary directory,
        removed by `close`); other formats need nothing of a GGUF."""
        if fmt != "gguf":
            return options
        if self._config_dir is None:
            self._config_dir = Path(tempfile.mkdtemp(prefix="loractl-gguf-"))
            (self._config_dir / "config.json").write_text(json.dumps(self.config()))
        return replace(options, base=self._config_dir)

    def place(self, module: str, m: ModuleInfo, adapter: AdapterInfo) -> Placement | Finding:
        """The tensor `module` updates, or why it has none."""
        adapter_arch = adapter_architecture(adapter.config, adapter.format)
        if adapter_arch and adapter_arch != self.arch:
            return error(
                "base-architecture", f"a {adapter_arch} adapter cannot merge into this {self.arch} model", module
            )
        found = self._where(module)
        if isinstance(found, Finding):
            return found
        return self._check_type(found, module)

    def _check_type(self, found: Placement, module: str) -> Placement | Finding:
        """`found`, or why its tensor cannot be written back in its own type."""
        key, kind = found.key, self.type_name(found.key)
        if writable(kind) and key not in self.importance:
            return found
        if kind not in ggml_quant.QUANTIZABLE:
            return error("base-type", f"{key} is {kind}, which neither gguf-py nor llama.cpp can quantize "
                         f"(writable: {', '.join(sorted({*writable_types(), *ggml_quant.QUANTIZABLE}))})",
                         module)  # fmt: skip
        ggml_quant.library()  # the extra to install, before any work
        if ggml_quant.requires_imatrix(kind) and key not in self.importance:
            where = f"{self.imatrix_path} has no entry for it" if self.imatrix_path else "pass --imatrix FILE"
            return error("base-type", f"{key} is {kind}, which llama.cpp quantizes only with an importance "
                         f"matrix: {where} (llama.cpp's imatrix GGUF or .dat)", module)  # fmt: skip
        return found

    def use_importance(self, path: Path) -> None:
        """Requantize with the importance matrix at `path` (`--imatrix`): each tensor it covers, whatever its
        quantized type, goes through llama.cpp's quantizer with its column weights, as llama-quantize does."""
        from .gguf_imatrix import read_imatrix

        self.imatrix_path = Path(path)
        for name, weights in read_imatrix(self.imatrix_path).items():
            t = self.tensors_by_name.get(name)
            if t is None or self.type_name(name) in FLOAT_TYPES:
                continue
            rows = self.shape(name)
            matrices = math.prod(rows[:-2]) if len(rows) > 2 else 1
            if weights.size != rows[-1] * matrices:
                raise FormatError(f"importance matrix entry {name!r} has {weights.size} values; the tensor needs "
                                  f"{rows[-1] * matrices}", path=self.imatrix_path)  # fmt: skip
            if self.type_name(name) in ggml_quant.QUANTIZABLE:
                self.importance[name] = weights

    def _where(self, module: str) -> Placement | Finding:
        stem = gguf_names.to_gguf(self.tmap, module)
        key = f"{stem}.weight"
        if stem is None or key not in self.tensors_by_name:
            tied = " (this GGUF ties the output head to token_embd)" if stem == "output" else ""
            return error("not-in-base", f"no tensor of this {self.arch} GGUF for the module{tied}", module)
        heads = self.heads.heads_for(module) if self.heads and is_rope_module(module) else None
        return Placement(key, rope_heads=heads)

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False,
        scheme: str = STREAM,
    ) -> str | None:  # fmt: skip
        """`Checkpoint.fingerprint` of the Hugging Face checkpoint this file was converted from, when its
        tensors are stored unquantized (F32, F16, BF16: q/k rows put back in Hugging Face's order); else None.
        Remembered per file identity (`io.fingerprint_cache`) unless `fresh`."""
        from ..io.fingerprint_cache import remembered

        placed = self._placed(modules)
        if placed is None:
            return None
        names, kind = [n for n, _ in placed], cache_kind("gguf", scheme)
        return remembered(kind, self.paths, names, lambda: self._hash(placed, stop, scheme), fresh=fresh)

    def _hash(self, placed: list[tuple[str, Placement]], stop: Callable[[], bool] | None, scheme: str) -> str:
        from ..io.checkpoint import fingerprint_of, hash_order
        from ..io.read_pace import when_allowed

        at = dict(placed)
        order = hash_order(at, lambda n: (self.shard_of[at[n].key], self.tensors_by_name[at[n].key].offset), scheme)
        tensors = [(n, self.type_name(at[n].key), self.shape(at[n].key),
                    when_allowed(at[n].key, partial(self._hf_bytes, at[n]))) for n in order]  # fmt: skip
        return fingerprint_of(tensors, stop, scheme)

    def _hf_bytes(self, p: Placement) -> Iterator[bytes]:
        """The stored bytes of `p.key` in Hugging Face's row order, `HASH_BLOCK` bytes at a time (q/k rows are permuted
        within each head, so a block of whole heads is its own permutation)."""
        import numpy as np

        from ..io import checkpoint

        shape, t = self.shape(p.key), self.tensors_by_name[p.key]
        rows = shape[0]
        per_row, unit = t.n_bytes // rows, rows // p.rope_heads if p.rope_heads else 1
        step = max(1, checkpoint.HASH_BLOCK // max(1, per_row * unit)) * unit
        for a in range(0, rows, step):
            b = min(rows, a + step)
            raw = np.frombuffer(read_range(self.paths[self.shard_of[p.key]], t.offset + a * per_row, (b - a) * per_row),
                                dtype=np.uint8).reshape(b - a, per_row)  # fmt: skip
            yield raw.tobytes() if not p.rope_heads else self._hf_order(raw, a, p).tobytes()

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        from ..io.fingerprint_cache import remembered

        placed = self._placed(modules) or []
        return remembered("gguf-views", self.paths, [n for n, _ in placed], lambda: self._views(placed))

    def _views(self, placed: list[tuple[str, Placement]]) -> dict[str, str]:
        from ..formats._rope import meta_to_hf
        from ..io.checkpoint import FingerprintViews
        from ..io.tensor_bytes import torch_dtype

        views = FingerprintViews()
        for name, p in placed:
            values = self.read_float32(p.key).to(torch_dtype(self.type_name(p.key)))
            views.feed(name, meta_to_hf(values, p.rope_heads) if p.rope_heads else values)
        return views.digests()

    def _placed(self, modules: Iterable[str]) -> list[tuple[str, Placement]] | None:
        """(`<module>.weight`, placement) in fingerprint order; None when a tensor is quantized."""
        placed = [(f"{m}.weight", p) for m in modules if isinstance(p := self._where(m), Placement)]
        if any(self.type_name(p.key) not in FLOAT_TYPES for _, p in placed):
            return None
        return sorted(placed, key=lambda x: x[0])

    def _hf_order(self, raw: np.ndarray[Any, Any], first: int, p: Placement) -> np.ndarray[Any, Any]:
        """Stored rows `first`… (whole heads, in Meta's RoPE order) put in Hugging Face's row order."""
        import numpy as np
        import torch

        from ..formats._rope import hf_to_meta

        assert p.rope_heads
        meta_of = hf_to_meta(
            torch.arange(self.shape(p.key)[0]), p.rope_heads
        ).numpy()  # meta row i is hf row meta_of[i]
        out = np.empty_like(raw)
        out[meta_of[first : first + raw.shape[0]] - first] = raw
        return out

    def output_files(self, output: Path) -> list[Path]:
        """The files a merge into this base writes for `-o output`: `output` itself, or for a split model one
        shard each, named as llama.cpp names them (`output` may name the first shard or the prefix + .gguf)."""
        if len(self.paths) == 1:
            return [output]
        n = len(self.paths)
        named = SPLIT_NAME.match(output.name)
        prefix = named["prefix"] if named and int(named["count"]) == n else output.name.removesuffix(".gguf")
        return [output.with_name(f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]

    def write(
        self,
        tmp: Path,
        provenance: dict[str, Any],
        names: Iterable[str],
        sink: TensorSink,
        *,
        shards: Iterable[Path] = (),
    ) -> None:
        """The model with `provenance` in its KV metadata; each tensor of `names` merged by `sink`, requantized
        into its own type and written over its bytes (the others are copied as they are). A split model's
        other shards go to `shards` (in order: `output_files`), each with its own tensors."""
        targets = [tmp, *shards]
        if len(targets) != len(self.paths):
            raise ValueError(f"a model in {len(self.paths)} shards is written to as many files, not {len(targets)}")
        from ..io.write_queue import copy_range, write_all  # imports torch: only when writing

        record = json.dumps(provenance, sort_keys=True)
        todo = list(names)
        for i, (path, header, target) in enumerate(zip(self.paths, self.headers, targets, strict=True)):
            raw_header = _header_with(header, record if i == 0 else None)
            shift = len(raw_header) - header.data_offset
            merged = [k for k in todo if self.shard_of[k] == i]
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, memoryview(raw_header))
                for start, stop in _gaps(header, path.stat().st_size, merged, self.tensors_by_name):
                    os.lseek(fd, start + shift, os.SEEK_SET)  # the bytes no adapter changes: a kernel copy
                    copy_range(path, start, stop - start, fd)
                for key in merged:
                    at = self.offset(key) + shift
                    for raw in sink.blocks(key, partial(self.read_rows, key), partial(self.encode_rows, key)):
                        os.lseek(fd, at, os.SEEK_SET)
                        write_all(fd, memoryview(raw))
                        at += len(raw)
            finally:
                os.close(fd)

    def weights(self) -> Weights:
        return GgufWeights(self)

    def read_float32(self, key: str) -> torch.Tensor:
        """The tensor dequantized to float32, in numpy order."""
        return self.read_rows(key, 0, self.shape(key)[0])

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor (its first dimension) dequantized to float32, read from the file (not
        mapped: the pages of a large base never stay resident)."""
        import numpy as np
        import torch

        t, kind, shape = self.tensors_by_name[key], self.type_name(key), self.shape(key)
        per_row = t.n_bytes // shape[0]
        raw = np.frombuffer(read_range(self.paths[self.shard_of[key]], t.offset + start * per_row,
                                       (stop - start) * per_row), dtype=np.uint8)  # fmt: skip
        return torch.from_numpy(self._decode(raw, kind, (stop - start, *shape[1:])))

    def _decode(self, raw: np.ndarray[Any, Any], kind: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        """Bytes of whole rows of type `kind` as float32 values of `shape` (writable: from a fresh buffer)."""
        import numpy as np

        gguf = gguf_names.require_gguf()
        count = math.prod(shape)
        if kind == "F32":
            return np.frombuffer(bytearray(raw), dtype=np.float32).reshape(shape)
        if _native(kind):  # llama.cpp's own: in C, without gguf-py's numpy temporaries
            return ggml_quant.dequantize(raw, kind, count).reshape(shape)
        values = gguf.quants.dequantize(raw.reshape(-1, raw.size // max(1, count // shape[-1])), _qtype(kind))
        return np.array(values, dtype=np.float32).reshape(shape)

    def encode(self, key: str, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """`values` (the whole tensor) in the tensor's own type: the bytes to store, and what they dequantize to."""
        return self.encode_rows(key, 0, values)

    def encode_rows(self, key: str, start: int, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """Rows `start`… of the tensor, `values` (float32), in its own type: the bytes to store (rows are
        quantized independently, so a block's bytes are the whole tensor's), and what they dequantize to."""
        import numpy as np
        import torch

        gguf = gguf_names.require_gguf()
        t, kind, shape = self.tensors_by_name[key], self.type_name(key), self.shape(key)
        expected = t.n_bytes // shape[0] * values.shape[0]
        if _native(kind) or (kind not in FLOAT_TYPES and (key in self.importance or not writable(kind))):
            raw = ggml_quant.quantize(values.numpy(), kind, self._importance_rows(key, start, values.shape[0]))
        elif kind == "F32":
            raw = values.numpy().tobytes()
        else:
            raw = np.ascontiguousarray(gguf.quants.quantize(values.numpy(), _qtype(kind))).tobytes()
        if len(raw) != expected:
            raise FormatError(f"internal: {key} requantized to {len(raw)} bytes, not {expected}", path=self.path)
        if kind == "F32":
            return raw, values
        back = self._decode(np.frombuffer(raw, dtype=np.uint8), kind, tuple(values.shape))
        return raw, torch.from_numpy(back)

    def _importance_rows(self, key: str, start: int, rows: int) -> np.ndarray[Any, Any] | None:
        """The importance matrix's column weights for rows `start`… : one row for a matrix, the experts' rows
        of a 3-D tensor (one per matrix, and a block of its first dimension is whole matrices)."""
        weights = self.importance.get(key)
        if weights is None or len(self.shape(key)) < 3:
            return weights
        return weights.reshape(self.shape(key)[0], -1)[start : start + rows]

    def offset(self, key: str) -> int:
        """Where the tensor's bytes start in its file (its shard's, for a split model)."""
        return self.tensors_by_name[key].offset

    def _heads(self) -> RopeHeads | None:
        if self.arch not in gguf_names.PERMUTED_ARCHS:
            return None
        n = self.fields.get(f"{self.arch}.attention.head_count")
        kv = self.fields.get(f"{self.arch}.attention.head_count_kv") or n
        if not isinstance(n, int) or not isinstance(kv, int):
            raise FormatError(
                f"{self.arch} GGUF without integer {self.arch}.attention.head_count(_kv)",
                path=self.path,
                hint="llama.cpp's q/k row order cannot be matched without the head counts",
            )
        return RopeHeads(n, kv)


class GgufWeights:
    """The model as the Hugging Face checkpoint it was converted from (`protocol.Weights`, for `extract`):
    names mapped back by gguf-py's map (unmapped ones keep their GGUF name), q/k rows put back in Hugging
    Face's order, F32/F16/BF16 tensors in their own dtype, quantized ones dequantized (`info` says F32);
    the tensors the converter computes from the config (`GENERATED`) are left out, as no checkpoint has them."""

    def __init__(self, base: GgufBase) -> None:
        self.base, self.path, self.files = base, base.path, list(base.paths)
        stored = [k for k in base.tensors_by_name if not k.startswith(GENERATED)]
        hf, _ = gguf_names.from_gguf(base.tmap, stored, None, {})
        self._key = {hf.get(k, k): k for k in stored}
        self.quantized = frozenset(n for n, k in self._key.items() if base.type_name(k) not in FLOAT_TYPES)

    @property
    def names(self) -> list[str]:
        return list(self._key)

    def __contains__(self, name: object) -> bool:
        return name in self._key

    def info(self, name: str) -> TensorInfo:
        from ..io.safetensors_header import TensorInfo
        from ..io.tensor_bytes import torch_dtype

        dtype, shape = self._dtype(name), self.base.shape(self._key[name])
        return TensorInfo(dtype, shape, (0, math.prod(shape) * torch_dtype(dtype).itemsize))

    def get(self, name: str) -> torch.Tensor:
        from ..formats._rope import meta_to_hf
        from ..io.tensor_bytes import torch_dtype

        values = self.base.read_float32(self._key[name]).to(torch_dtype(self._dtype(name)))  # F16, BF16: exact
        module = name.removesuffix(".weight")
        heads = self.base.heads.heads_for(module) if self.base.heads and is_rope_module(module) else None
        return meta_to_hf(values, heads) if heads else values

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def fingerprint(
        self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False, scheme: str = STREAM
    ) -> str:
        return self.base.fingerprint([n.removesuffix(".weight") for n in names], stop, fresh=fresh, scheme=scheme) or ""

    def merge_record(self) -> Any:
        return _json_or_none(self.base.fields.get(RECORD_KEY))

    def _dtype(self, name: str) -> str:
        return "F32" if name in self.quantized else self.base.type_name(self._key[name])


def _json_or_none(text: Any) -> Any:
    """A provenance record stored as JSON text in a base's metadata; None when absent or damaged."""
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _gaps(header: GgufHeader, size: int, merged: list[str], tensors: dict[str, TensorEntry]) -> list[tuple[int, int]]:
    """The byte ranges of a file's data that the merged tensors do not cover (copied as they are)."""
    out, at = [], header.data_offset
    for t in sorted((tensors[k] for k in merged), key=lambda t: t.offset):
        if t.offset > at:
            out.append((at, t.offset))
        at = max(at, t.offset + t.n_bytes)
    return [*out, (at, size)] if size > at else out


def _fields(header: GgufHeader) -> dict[str, Any]:
    return {k: v for k, v in header.fields.items() if not k.startswith("tokenizer.")}


@cache
def _native(kind: str) -> bool:
    """Whether a block-quantized type goes through llama.cpp's own quantizer and dequantizer (whenever the
    library is installed: its bytes are llama-quantize's, and C is ~10× gguf-py's numpy), not gguf-py's."""
    return kind not in FLOAT_TYPES and kind in ggml_quant.QUANTIZABLE and ggml_quant.available()


def _qtype(kind: str) -> Any:
    return gguf_names.require_gguf().GGMLQuantizationType[kind]


def _shards(path: Path, first: GgufHeader, fields: dict[str, Any]) -> tuple[list[Path], list[GgufHeader]]:
    """Every shard of the model whose first file is `path` (just `path` when it is not split), checked
    against the `split.*` entries llama.cpp writes: the number, the order, the tensor count."""
    count, no = fields.get("split.count", 1), fields.get("split.no", 0)
    if not isinstance(count, int) or not isinstance(no, int) or count < 1 or not 0 <= no < count:
        raise FormatError(f"split.count {count!r} / split.no {no!r} are not a shard number", path=path)
    if count == 1:
        return [path], [first]
    named = SPLIT_NAME.match(path.name)
    if no != 0 or named is None or int(named["count"]) != count:
        raise FormatError(
            f"shard {no + 1} of a model split in {count}",
            path=path,
            hint=f"name the first shard, NAME-00001-of-{count:05d}.gguf, as llama.cpp loads a split model",
        )
    paths = [path.with_name(f"{named['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    headers = [first]
    for i, shard in enumerate(paths[1:], start=1):
        if not shard.is_file():
            raise FormatError(f"shard {i + 1} of {count} is missing", path=shard,
                              hint="every shard of a split model sits beside the first, named as gguf-split names them")  # fmt: skip
        header = read_header(shard)
        got = _fields(header)
        if (got.get("split.no"), got.get("split.count")) != (i, count):
            raise FormatError(f"not shard {i + 1} of {count} (split.no {got.get('split.no')!r}, split.count "
                              f"{got.get('split.count')!r})", path=shard)  # fmt: skip
        headers.append(header)
    total = sum(len(h.tensors) for h in headers)
    if fields.get("split.tensors.count", total) != total:
        raise FormatError(f"the shards hold {total} tensors, split.tensors.count says {fields['split.tensors.count']}",
                          path=path)  # fmt: skip
    return paths, headers


def _header_with(header: GgufHeader, record: str | None) -> bytes:
    """The file's header with `RECORD_KEY` set to `record` (replacing one a merged base has), padded to
    the alignment, or as it is when `record` is None: the other KV entries and the tensor infos byte for byte."""
    if record is None:
        return header.header + b"\0" * (header.data_offset - len(header.header))
    gguf = gguf_names.require_gguf()
    kv, count = header.kv_bytes(without=RECORD_KEY)
    key, value = RECORD_KEY.encode(), record.encode()
    entry = struct.pack(f"<Q{len(key)}sIQ{len(value)}s", len(key), key, gguf.GGUFValueType.STRING, len(value), value)
    counts = struct.pack("<QQ", len(header.tensors), count + 1)
    out = header.header[:8] + counts + kv + entry + header.header[header.kv_end :]
    return out + b"\0" * (-len(out) % header.alignment)


def adapter_architecture(info_config: dict[str, Any], fmt: str) -> str | None:
    """The architecture a GGUF adapter was written for (other formats do not say)."""
    arch = info_config.get("general.architecture") if fmt == "gguf" else None
    return arch if isinstance(arch, str) and arch else None


@cache
def writable(kind: str) -> bool:
    """Whether gguf-py can quantize to and dequantize from the type named `kind` (tried on one block)."""
    import numpy as np

    gguf = gguf_names.require_gguf()
    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    sample: np.ndarray[Any, Any] = np.linspace(-1, 1, math.lcm(block, 256), dtype=np.float32).reshape(1, -1)
    try:
        gguf.quants.dequantize(gguf.quants.quantize(sample, qtype), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def writable_types() -> list[str]:
    gguf = gguf_names.require_gguf()
    return [t.name for t in gguf.GGMLQuantizationType if writable(t.name)]
