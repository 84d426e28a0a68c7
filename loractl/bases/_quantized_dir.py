"""A Hugging Face checkpoint whose weights are stored quantized: what bitsandbytes (`bnb.py`) and FP8
block-scaled (`fp8.py`) checkpoints share, over a `Codec` that knows one scheme.

A quantized weight is one logical tensor (`…q_proj.weight`, (out, in)) stored as several: its codes
and companions (absmax, quant_map, scales…). The base lists, places, reads (dequantized to float32) and
fingerprints logical tensors, and writes itself as a checkpoint directory, one tensor at a time:
merged weights requantized in their own scheme (`keep`), or every quantized weight written
dequantized in a float dtype with `quantization_config` removed from config.json. The writer orders
tensors by dtype width, so a merged weight's scales (float32) are written before its codes (one
byte): the codes computed with them wait in a spill file inside the output's temporary directory
(removed before it is renamed), never in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError
from ..findings import Finding, error
from ..io.checkpoint import RECORD_NAME, STREAM, WEIGHT_SUFFIXES, Checkpoint
from ..io.dtypes import CONFIG_NAMES, FLOAT_CODES
from ..io.safetensors_writer import FileRange, TensorSpec
from ._placement import Placement
from .protocol import BaseTensor, OutputChoices, TensorSink

if TYPE_CHECKING:
    import torch

    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from ..io.safetensors_header import TensorInfo
    from ..io.safetensors_writer import Block, TensorData
    from .protocol import Weights


@dataclass(frozen=True)
class Stored:
    """One logical weight as its scheme stores it."""

    name: str  # `<module>.weight`
    shape: tuple[int, ...]  # (out, in)
    scheme: str  # "NF4", "FP4", "INT8", "F8_E4M3": what the report calls its stored type
    keys: tuple[str, ...]  # every stored tensor of it


class Codec(Protocol):
    """One quantization scheme: which stored tensors make a weight, and the weight to and from float32."""

    method: str  # `quantization_config.quant_method`
    keeps_by_default: bool  # a merge requantizes (FP8) or writes the weights dequantized (bitsandbytes)

    def find(self, ckpt: Checkpoint) -> dict[str, Stored]: ...

    def dequantize(self, ckpt: Checkpoint, w: Stored) -> torch.Tensor:
        """The weight as float32 (out, in), by the scheme's own dequantizer."""
        ...

    def encode(self, ckpt: Checkpoint, w: Stored, start: torch.Tensor, values: torch.Tensor) -> Encoded:
        """`values` (float32, the merge of `start`) in the scheme: the stored tensors and what they dequantize to."""
        ...

    def row_multiple(self, ckpt: Checkpoint, w: Stored, requantize: bool) -> int:
        """The rows a block of the weight must be a multiple of, to be dequantized (and, if `requantize`,
        encoded) on its own: the rows one quantization block spans (the weight's row count: only whole)."""
        ...

    def dequantize_rows(self, ckpt: Checkpoint, w: Stored, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the weight as float32 (start a multiple of `row_multiple`)."""
        ...

    def encode_rows(
        self, ckpt: Checkpoint, w: Stored, first: int, start: torch.Tensor, values: torch.Tensor
    ) -> Encoded:
        """`encode` of rows `first`… (a multiple of `row_multiple(…, True)`): each stored tensor's rows for them."""
        ...

    def merged_shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape stored tensor `key` has once its weight is requantized (a JSON state can grow)."""
        ...

    def dequantized_dtype(self, ckpt: Checkpoint) -> str:
        """The float code dequantized weights are written in when no `--dtype` says (the compute dtype)."""
        ...


@dataclass(frozen=True)
class Encoded:
    tensors: dict[str, torch.Tensor]  # stored key → tensor in its stored dtype and merged shape
    values: torch.Tensor  # float32 (out, in): what the stored tensors dequantize to


class QuantizedCheckpoint:
    """A quantized Hugging Face checkpoint as a base (`bases.RewritableBase`), its output as `choices` ask."""

    def __init__(self, path: Path, codec: Codec, choices: OutputChoices | None = None) -> None:
        choices = choices or OutputChoices()
        if choices.keep_quant and choices.dtype is not None:
            raise UsageError(
                "--keep-quant keeps the base's quantization; --dtype writes its weights dequantized",
                hint="drop one of --keep-quant and --dtype",
            )
        self.path, self.codec, self.choices = Path(path), codec, choices
        self.keep = choices.keep_quant or (codec.keeps_by_default and choices.dtype is None)
        self.ckpt = Checkpoint(path)
        self.stored = codec.find(self.ckpt)
        self._owner = {k: w.name for w in self.stored.values() for k in w.keys}
        self.plain = [n for n in self.ckpt.names if n not in self._owner]
        self.dtype = choices.dtype or codec.dequantized_dtype(self.ckpt)  # dequantized weights' dtype

    @property
    def kind(self) -> str:
        """ "bitsandbytes nf4", "fp8 f8_e4m3"; ", written as bfloat16" when the merge writes it dequantized."""
        schemes = "/".join(sorted({w.scheme.lower() for w in self.stored.values()}))
        return f"{self.codec.method} {schemes}" + (
            "" if self.keep else f", written as {CONFIG_NAMES.get(self.dtype, self.dtype)}"
        )

    def close(self) -> None:
        self.ckpt.close()

    def tensors(self) -> dict[str, BaseTensor]:
        """Logical tensors with the type the merge writes them in (a quantized scheme only when kept)."""
        out = {}
        for n in self.plain:
            info = self.ckpt.info(n)
            dtype = self._plain_dtype(info.dtype)
            out[n] = BaseTensor(n, info.shape, dtype, converted=dtype != info.dtype)
        for n, w in self.stored.items():
            keep = BaseTensor(n, w.shape, w.scheme, quantized=True)
            out[n] = keep if self.keep else BaseTensor(n, w.shape, self.dtype, converted=True)
        return out

    def read_options(self, fmt: str, options: ReadOptions) -> ReadOptions:
        return replace(options, base=self.path)

    def place(self, module: str, m: ModuleInfo, adapter: AdapterInfo) -> Placement | Finding:
        key = f"{module}.weight"
        if key in self.stored:
            return Placement(key)
        if key not in self.plain:
            return error("not-in-base", f"the base has no tensor {key!r}", module)
        if self.ckpt.info(key).dtype not in FLOAT_CODES:
            return error(
                "base-dtype", f"base tensor {key!r} is {self.ckpt.info(key).dtype}, not floating point", module
            )
        return Placement(key)

    def read_float32(self, name: str) -> torch.Tensor:
        w = self.stored.get(name)
        return self.codec.dequantize(self.ckpt, w) if w else self.ckpt.get(name).float()

    def weights(self) -> Weights:
        return QuantizedWeights(self)

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False,
        scheme: str = STREAM,
    ) -> str | None:  # fmt: skip
        """`Checkpoint.fingerprint` of the touched weights; None when one is quantized (no stored float bytes)."""
        names = self._touched(modules)
        return None if names is None else self.ckpt.fingerprint(names, stop, fresh=fresh, scheme=scheme)

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        return self.ckpt.fingerprint_views(self._touched(modules) or [])

    def _touched(self, modules: Iterable[str]) -> list[str] | None:
        names = sorted(n for m in modules if (n := f"{m}.weight") in self.stored or n in self.plain)
        return None if any(n in self.stored for n in names) else names

    def _plain_dtype(self, dtype: str) -> str:
        return self.choices.dtype if self.choices.dtype and dtype in FLOAT_CODES else dtype

    def write(self, tmp: Path, provenance: dict[str, Any], names: Iterable[str], sink: TensorSink) -> None:
        """The checkpoint directory at `tmp`: tensors merged by `sink`, the others copied (or dequantized),
        the base's other files, config.json without `quantization_config` unless kept, and the record."""
        from ..io.checkpoint_writer import write_sharded

        tmp.mkdir()
        writer = _Writer(self, set(names), sink, tmp)
        try:
            write_sharded(tmp, writer.specs, writer.produce, self._shard_bytes(writer.specs), {"format": "pt"})
        finally:
            writer.spill.close()
            writer.rows_spill.close()
        self._copy_files(tmp, provenance)

    def _shard_bytes(self, specs: list[TensorSpec]) -> int:
        """`--max-shard-size`, else as many shards as the base has (their size grows with the dequantized weights)."""
        if self.choices.max_shard_bytes is not None:
            return self.choices.max_shard_bytes
        shards = max(1, len(self.ckpt.files))
        return max(1, -(-sum(s.nbytes for s in specs) // shards))

    def _copy_files(self, tmp: Path, provenance: dict[str, Any]) -> None:
        record = dict(provenance)
        for src in self.ckpt.other_files():
            if src.name.endswith(WEIGHT_SUFFIXES):
                continue
            if src.name == RECORD_NAME:
                record["base_record"] = json.loads(src.read_text())
            elif src.name == "config.json" and not self.keep:
                (tmp / src.name).write_text(json.dumps(self._dequantized_config(), indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(src, tmp / src.name)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _dequantized_config(self) -> dict[str, Any]:
        config = {k: v for k, v in self.ckpt.config().items() if k != "quantization_config"}
        if self.choices.dtype is not None:
            config |= {k: CONFIG_NAMES[self.choices.dtype] for k in ("dtype", "torch_dtype") if k in config}
        return config


class _Writer:
    """Produces each output tensor when `write_sharded` asks for it; a merged weight's other stored
    tensors go to the spill file until their turn."""

    def __init__(self, base: QuantizedCheckpoint, merged: set[str], sink: TensorSink, tmp: Path) -> None:
        self.base, self.merged, self.sink = base, merged, sink
        self.spill = _Spill(tmp / ".loractl-spill")  # inside the temporary: a killed run's is cleaned with it
        self.rows_spill = _Spill(tmp / ".loractl-spill-rows")  # a merged weight written after its scales
        self.spilled: dict[str, FileRange] = {}
        self.specs = [self._spec(n) for n in base.plain]
        for w in base.stored.values():
            if base.keep:
                self.specs += [self._kept_spec(w, k) for k in w.keys]
            else:
                self.specs.append(TensorSpec(w.name, base.dtype, w.shape))

    def _spec(self, name: str) -> TensorSpec:
        info = self.base.ckpt.info(name)
        return TensorSpec(name, self.base._plain_dtype(info.dtype), info.shape)

    def _kept_spec(self, w: Stored, key: str) -> TensorSpec:
        info = self.base.ckpt.info(key)
        shape = self.base.codec.merged_shape(key, info.shape) if w.name in self.merged else info.shape
        return TensorSpec(key, info.dtype, shape)

    def produce(self, key: str) -> TensorData:
        from ..io.tensor_bytes import torch_dtype

        base, owner = self.base, self.base._owner.get(key)
        if owner is None:
            return self._plain(key)
        if key in self.spilled:
            return self.spilled.pop(key)
        w = base.stored[owner]
        if base.keep and owner not in self.merged:
            return _file_range(base.ckpt, key)
        if owner not in self.merged:
            return base.codec.dequantize(base.ckpt, w).to(torch_dtype(base.dtype))
        blocks = self._merged(w)
        if key == w.name:
            return blocks  # the write consumes it, then spills the other stored tensors (`_merged`)
        for block in blocks:  # another stored tensor first: the weight's blocks wait in a spill file
            self.rows_spill.put_part(block[0])
        self.spilled[w.name] = self.rows_spill.end_part()
        return self.spilled.pop(key)

    def _merged(self, w: Stored) -> Iterator[Block]:
        """The merged weight's blocks of rows in its output dtype (dequantized, or requantized in the scheme);
        once they are all out, the scheme's other stored tensors (block scales…) go to the spill file."""
        import torch

        from ..io.tensor_bytes import torch_dtype

        base, codec = self.base, self.base.codec
        rows = partial(codec.dequantize_rows, base.ckpt, w)
        multiple = codec.row_multiple(base.ckpt, w, base.keep)
        if not base.keep:
            dtype = torch_dtype(base.dtype)

            def cast(_: int, merged: torch.Tensor) -> tuple[Block, torch.Tensor]:
                out = merged.to(dtype)
                return (out, None), out.float()

            yield from self.sink.blocks(w.name, rows, cast, multiple)
            return
        parts: dict[str, list[torch.Tensor]] = {}

        def encode(first: int, merged: torch.Tensor) -> tuple[Block, torch.Tensor]:
            encoded = codec.encode_rows(base.ckpt, w, first, rows(first, first + merged.shape[0]), merged)
            for k, t in encoded.tensors.items():
                if k != w.name:
                    parts.setdefault(k, []).append(t)
            return (encoded.tensors[w.name], None), encoded.values

        yield from self.sink.blocks(w.name, rows, encode, multiple)
        for k, ts in parts.items():
            self.spilled[k] = self.spill.put(ts[0] if len(ts) == 1 else torch.cat(ts))

    def _plain(self, key: str) -> TensorData:
        from ..io.tensor_bytes import torch_dtype

        ckpt, dtype = self.base.ckpt, self.base._plain_dtype(self.base.ckpt.info(key).dtype)
        if key in self.merged:
            out_dtype = torch_dtype(dtype)

            def cast(_: int, merged: torch.Tensor) -> tuple[Block, torch.Tensor]:
                out = merged.to(out_dtype)
                return (out, None), out.float()

            return self.sink.blocks(key, partial(ckpt.get_rows, key), cast)
        if dtype != ckpt.info(key).dtype:
            return ckpt.get(key).to(torch_dtype(dtype))
        return _file_range(ckpt, key)


class _Spill:
    """An append-only scratch file of tensors' bytes, removed when closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = self._start = 0

    def put(self, tensor: torch.Tensor) -> FileRange:
        self.put_part(tensor)
        return self.end_part()

    def put_part(self, tensor: torch.Tensor) -> None:
        """Append `tensor`'s bytes to the part `end_part` closes (a tensor spilled a block of rows at a time)."""
        from ..io.tensor_bytes import dtype_code, tensor_to_bytes

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        data = tensor_to_bytes(tensor, dtype_code(tensor.dtype))
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._size + done)
        self._size += len(data)

    def end_part(self) -> FileRange:
        where = FileRange(self.path, self._start, self._size - self._start)
        self._start = self._size
        return where

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def _file_range(ckpt: Checkpoint, key: str) -> FileRange:
    return ckpt.file_range(key)


class QuantizedWeights:
    """The checkpoint as the Hugging Face model it quantizes (`protocol.Weights`, for `extract`): every
    logical tensor by name, quantized weights dequantized to float32 (`info` says F32), companions hidden."""

    def __init__(self, base: QuantizedCheckpoint) -> None:
        self.base, self.path, self.files = base, base.path, base.ckpt.files
        self.quantized = frozenset(base.stored)

    @property
    def names(self) -> list[str]:
        return [*self.base.plain, *self.base.stored]

    def __contains__(self, name: object) -> bool:
        return name in self.base.stored or name in self.base.plain

    def info(self, name: str) -> TensorInfo:
        from ..io.safetensors_header import TensorInfo

        w = self.base.stored.get(name)
        if w is None:
            return self.base.ckpt.info(name)
        return TensorInfo("F32", w.shape, (0, 4 * w.shape[0] * w.shape[1]))

    def get(self, name: str) -> torch.Tensor:
        return self.base.read_float32(name) if name in self.base.stored else self.base.ckpt.get(name)

    def config(self) -> dict[str, Any]:
        return self.base.ckpt.config()

    def merge_record(self) -> Any:
        return self.base.ckpt.merge_record()

    def fingerprint(
        self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False, scheme: str = STREAM
    ) -> str:
        plain = [n for n in names if n in self.base.plain]
        return "" if len(plain) < len(names) else self.base.ckpt.fingerprint(plain, stop, fresh=fresh, scheme=scheme)


def quant_method(path: Path) -> str | None:
    """`quantization_config.quant_method` of the checkpoint directory at `path` (None without one)."""
    from ..errors import FormatError
    from ..io.config_json import read_config

    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    try:
        config = read_config(path) or {}
    except FormatError:
        return None
    q = config.get("quantization_config")
    return str(q.get("quant_method")) if isinstance(q, dict) else None


def quantization_config(ckpt: Checkpoint) -> dict[str, Any]:
    q = ckpt.config().get("quantization_config")
    return q if isinstance(q, dict) else {}
