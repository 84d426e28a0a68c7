"""A llama.cpp GGUF *model* file as a base: its tensors, their types, and where each module lands.

Module paths map to GGUF names with gguf-py's own name map (`names`), as for GGUF adapters;
q/k weights of Llama-family architectures hold their rows in Meta's RoPE order (`rope.py`), so a
ΔW is permuted the way llama.cpp's converter permuted the base. A tensor is rewritten in its own
type: gguf-py must both dequantize and quantize it (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, … —
probed, not listed, so a newer gguf-py widens the set by itself). The output keeps every tensor
info and byte of the base; loractl's provenance is one more KV entry (`loractl.merge`), which
llama.cpp ignores.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from ..findings import Finding, error
from ..formats._rope import RopeHeads, is_rope_module
from ..formats.gguf import names as gguf_names
from ._placement import Placement
from .protocol import BaseTensor, TensorSink, Weights

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import ReaderTensor

    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from ..io.safetensors_header import TensorInfo


RECORD_KEY = "loractl.merge"  # the KV entry that holds loractl's provenance in a merged model
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})  # stored as safetensors stores them: the fingerprint can be taken
GENERATED = "rope_"  # rope_freqs, rope_factors_*: computed from the config by llama.cpp's converter, in no checkpoint


def detect(path: Path) -> bool:
    """A file with the GGUF magic (model or adapter: `GgufBase` refuses adapters with a hint)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def open(path: Path) -> GgufBase:
    return GgufBase(path)


class GgufBase:
    """The parsed header of a GGUF model file; tensor data is read one tensor at a time (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        gguf = gguf_names.require_gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
            fields = {
                k: f.contents() for k, f in self.reader.fields.items() if not k.startswith(("GGUF.", "tokenizer."))
            }
        except Exception as e:  # gguf-py parsing a hostile file: any failure is the file's
            raise FormatError(f"not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})", path=path) from None
        if fields.get("general.type", "model") != "model":
            raise FormatError(
                f"GGUF file of type {fields['general.type']!r}, not a model",
                path=path,
                hint="a merge base and both checkpoints of extract are GGUF models; a GGUF LoRA adapter is "
                "an ADAPTER (loractl merge BASE ADAPTER)",
            )
        self.fields = fields
        self.arch = str(fields.get("general.architecture", ""))
        self.tensors_by_name: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
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
        """Remove the config directory `read_options` made (the file map is released with the reader)."""
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    @property
    def block_count(self) -> int:
        return int(self.fields.get(f"{self.arch}.block_count") or 1)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape in numpy (row-major) order, as Hugging Face stores the weight."""
        return tuple(int(n) for n in reversed(self.tensors_by_name[key].shape))

    def type_name(self, key: str) -> str:
        return str(self.tensors_by_name[key].tensor_type.name)

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
        kind = self.type_name(found.key)
        if not writable(kind):
            return error(
                "base-type",
                f"{found.key} is {kind}, which gguf-py cannot quantize back (it can: {', '.join(writable_types())})",
                module,
            )
        return found

    def _where(self, module: str) -> Placement | Finding:
        stem = gguf_names.to_gguf(self.tmap, module)
        key = f"{stem}.weight"
        if stem is None or key not in self.tensors_by_name:
            tied = " (this GGUF ties the output head to token_embd)" if stem == "output" else ""
            return error("not-in-base", f"no tensor of this {self.arch} GGUF for the module{tied}", module)
        heads = self.heads.heads_for(module) if self.heads and is_rope_module(module) else None
        return Placement(key, rope_heads=heads)

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False
    ) -> str | None:
        """`Checkpoint.fingerprint` of the Hugging Face checkpoint this file was converted from, when its
        tensors are stored unquantized (F32, F16, BF16: q/k rows put back in Hugging Face's order); else None.
        Remembered per file identity (`io.fingerprint_cache`) unless `fresh`."""
        from ..io.fingerprint_cache import remembered

        placed = self._placed(modules)
        if placed is None:
            return None
        return remembered("gguf", [self.path], [n for n, _ in placed], lambda: self._hash(placed, stop), fresh=fresh)

    def _hash(self, placed: list[tuple[str, Placement]], stop: Callable[[], bool] | None) -> str:
        from ..io.checkpoint import fingerprint_of

        tensors = [(n, self.type_name(p.key), self.shape(p.key), partial(self._hf_bytes, p)) for n, p in placed]
        return fingerprint_of(tensors, stop)

    def _hf_bytes(self, p: Placement) -> bytes:
        return bytes(self._hf_rows(p).tobytes())

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        from ..io.fingerprint_cache import remembered

        placed = self._placed(modules) or []
        return remembered("gguf-views", [self.path], [n for n, _ in placed], lambda: self._views(placed))

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

    def _hf_rows(self, p: Placement) -> np.ndarray[Any, Any]:
        """The stored bytes of `p.key` as rows, in Hugging Face's row order."""
        import numpy as np
        import torch

        from ..formats._rope import hf_to_meta

        rows = np.asarray(self.tensors_by_name[p.key].data).view(np.uint8).reshape(self.shape(p.key)[0], -1)
        if not p.rope_heads:
            return rows
        meta_of = hf_to_meta(torch.arange(rows.shape[0]), p.rope_heads).numpy()  # meta row i is hf row meta_of[i]
        out = np.empty_like(rows)
        out[meta_of] = rows
        return out

    def write(self, tmp: Path, provenance: dict[str, Any], names: Iterable[str], sink: TensorSink) -> None:
        """The model with `provenance` in its KV metadata; each tensor of `names` merged by `sink`, requantized
        into its own type and written over its bytes (the others are copied as they are)."""
        header, data_start = self._header_with(json.dumps(provenance, sort_keys=True))
        shift = len(header) - data_start
        with self.path.open("rb") as src, tmp.open("wb") as out:
            out.write(header)
            src.seek(data_start)
            shutil.copyfileobj(src, out, 1 << 24)
            for key in names:
                merged = sink.merged(key, self.read_float32(key))
                raw, stored = self.encode(key, merged)
                out.seek(self.offset(key) + shift)
                out.write(raw)
                sink.stored(key, stored)

    def _header_with(self, record: str) -> tuple[bytes, int]:
        """The header with `RECORD_KEY` set to `record` (replacing one a merged base has), padded to the
        alignment; and where the base's tensor data starts."""
        gguf = gguf_names.require_gguf()
        raw, data_start = self.reader.data, int(self.reader.data_offset)
        kv = [f for k, f in self.reader.fields.items() if not k.startswith("GGUF.")]
        infos = [t.field for t in self.reader.tensors]
        kv_bytes = b"".join(bytes(raw[f.offset : f.offset + _nbytes(f)]) for f in kv if f.name != RECORD_KEY)
        info_start = min((f.offset for f in infos), default=data_start)
        info_end = max((f.offset + _nbytes(f) for f in infos), default=info_start)
        key, value = RECORD_KEY.encode(), record.encode()
        entry = struct.pack(
            f"<Q{len(key)}sIQ{len(value)}s", len(key), key, gguf.GGUFValueType.STRING, len(value), value
        )
        counts = struct.pack("<QQ", len(infos), len(kv) - (RECORD_KEY in self.reader.fields) + 1)
        header = bytes(raw[:8]) + counts + kv_bytes + entry + bytes(raw[info_start:info_end])
        align = int(self.reader.alignment)
        return header + b"\0" * (-len(header) % align), data_start

    def weights(self) -> Weights:
        return GgufWeights(self)

    def read_float32(self, key: str) -> torch.Tensor:
        """The tensor dequantized to float32, in numpy order."""
        import numpy as np
        import torch

        gguf = gguf_names.require_gguf()
        t = self.tensors_by_name[key]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(
            np.array(values, dtype=np.float32).reshape(self.shape(key))
        )  # a copy: the map is read-only

    def encode(self, key: str, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """`values` in the tensor's own type: the bytes to store, and what they dequantize to."""
        import numpy as np
        import torch

        gguf = gguf_names.require_gguf()
        t = self.tensors_by_name[key]
        data = gguf.quants.quantize(values.numpy(), t.tensor_type)
        raw = np.ascontiguousarray(data).tobytes()
        if len(raw) != int(t.n_bytes):
            raise FormatError(f"internal: {key} requantized to {len(raw)} bytes, not {t.n_bytes}", path=self.path)
        back = gguf.quants.dequantize(np.frombuffer(raw, dtype=t.data.dtype).reshape(t.data.shape), t.tensor_type)
        return raw, torch.from_numpy(np.array(back, dtype=np.float32).reshape(values.shape))

    def offset(self, key: str) -> int:
        """Where the tensor's bytes start in the file."""
        return int(self.tensors_by_name[key].data_offset)

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
        self.base, self.path, self.files = base, base.path, [base.path]
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

    def fingerprint(self, names: list[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False) -> str:
        return self.base.fingerprint([n.removesuffix(".weight") for n in names], stop, fresh=fresh) or ""

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


def _nbytes(field: Any) -> int:
    return sum(int(part.nbytes) for part in field.parts)


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
