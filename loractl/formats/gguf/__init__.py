"""llama.cpp GGUF LoRA adapters (FORMATS.md §5), read and written through gguf-py.

One `.gguf` file: `general.type = adapter`, `adapter.type = lora`, one float32
`adapter.lora.alpha` for the whole file (scale = alpha / r per module, r from the tensor;
alpha 0 means no scaling), tensors `<gguf name>.weight.lora_a` (r, in) and `.lora_b`
(out, r) in numpy order (GGUF's `ne` is the reverse). Three things differ from PEFT:
`token_embd.lora_a` is Aᵀ, the q/k `lora_b` rows of Llama-family architectures are in
Meta's RoPE order (`rope.py`), and names are llama.cpp's (`gguf_names.py`). `*_norm`
tensors (mergekit) are full tensors; any other tensor is an error, as in llama.cpp.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import lineage
from ...errors import FormatError, UsageError
from ...findings import Finding, error
from ...info import AdapterInfo, FullTensorInfo, ModuleInfo
from ...io.values import MAX_INT, finite_number, parse_json, shown, tensor_name
from .._modules import recorded_layout
from .._rope import RopeHeads, base_config, is_rope_module, meta_to_hf
from ..options import Feature, ReadOptions, WriteOptions
from . import names as gguf_names
from .names import EMBEDDING, HEADS_KEY, MODULES_KEY, RECORD_KEY

if TYPE_CHECKING:
    import torch
    from gguf import GGUFReader, ReaderTensor

    from ...adapter import Adapter

NAME = "gguf"
# fan_in_fan_out: the factors are the same; loractl's record keeps the flag (`_record`)
HOLDS: frozenset[Feature] = frozenset({"module_rank", "embedding", "fan_in_fan_out"})
MAGIC = b"GGUF"
LEGACY_MAGICS = (b"ggla", b"algg")  # the old `ggml-adapter-model.bin`, either byte order
_ROLES = {".lora_a": "A", ".lora_b": "B"}
_DEFAULT = ReadOptions()


def detect(path: Path) -> bool:
    """A file starting with the GGUF magic (or the legacy `ggla` one, refused by `describe`)."""
    return path.is_file() and _magic(path) in (MAGIC, *LEGACY_MAGICS)


def describe(path: Path, options: ReadOptions = _DEFAULT) -> AdapterInfo:
    """Modules, shapes and the scale from the GGUF header and tensor directory (no tensor data)."""
    return _Layout(path, options).info


def read(path: Path, options: ReadOptions = _DEFAULT) -> Adapter:
    """Load the adapter: A and B in PEFT orientation and HF row order, scale alpha/r."""
    from .._reading import adapter_from_info

    layout = _Layout(path, options)
    tensors = layout.tensors
    heads = layout.rope_heads()

    def get(key: str) -> torch.Tensor:
        t = _to_torch(tensors[key])
        if key.endswith(".lora_a") and key.startswith(EMBEDDING + "."):
            return t.T.contiguous()
        module = layout.module_of.get(key)
        if key.endswith(".lora_b") and module is not None and heads and (n := heads.heads_for(module)):
            return meta_to_hf(t, n).contiguous()
        return t

    adapter = adapter_from_info(layout.info, get)
    extra: dict[str, Any] = {"architecture": layout.arch}
    if heads:
        extra["rope_heads"] = [heads.n_heads, heads.n_kv_heads]
    return replace(adapter, meta=replace(adapter.meta, extra={"gguf": extra}))


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write `adapter` as one GGUF adapter file (see `gguf_write`)."""
    from .writer import write_gguf

    return write_gguf(adapter, path, force=force, options=options or WriteOptions())


class _Layout:
    """The parsed header: architecture, alpha, module names and every structural finding."""

    def __init__(self, path: Path, options: ReadOptions) -> None:
        self.path, self.options = path, options
        self.reader = _open(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.fields = _fields(self.reader, path)
        self.arch = str(self.fields.get("general.architecture", ""))
        self.alpha = finite_number(self.fields.get("adapter.lora.alpha", 0.0), "adapter.lora.alpha", path)
        self.findings: list[Finding] = []
        self.module_of: dict[str, str] = {}
        self.info = self._describe()

    def rope_heads(self) -> RopeHeads | None:
        """Head counts for undoing the q/k permutation, when this architecture has one and it matters."""
        if self.arch not in gguf_names.PERMUTED_ARCHS or not any(map(is_rope_module, self.info.modules)):
            return None
        config = base_config(self.options.base)
        if config is not None:
            return RopeHeads.from_config(config)
        hint = "pass --base with the base model's directory (its config.json)"
        recorded = self.fields.get(HEADS_KEY)
        if recorded is None:
            raise UsageError(
                f"the q/k rows of this {self.arch} adapter are in llama.cpp's RoPE order; "
                "undoing it needs the head counts",
                path=self.path,
                hint=hint,
            )
        heads = self._recorded_heads(recorded)
        if heads is None:  # written by loractl, but a hint, not a proof: these cannot be right
            raise UsageError(
                f"{HEADS_KEY} {shown(recorded)} cannot be this adapter's head counts; "
                "undoing llama.cpp's RoPE order of its q/k rows needs the right ones",
                path=self.path,
                hint=hint,
            )
        return heads

    def _recorded_heads(self, recorded: Any) -> RopeHeads | None:
        """`loractl.rope_heads` when it can be right: two positive counts, kv dividing q, each q/k
        module's rows splitting into heads of even size; None otherwise."""
        if not (isinstance(recorded, list) and len(recorded) == 2):
            return None
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < MAX_INT for n in recorded):
            return None
        heads = RopeHeads(*recorded)
        if heads.n_kv_heads > heads.n_heads or heads.n_heads % heads.n_kv_heads:
            return None
        for name, module in self.info.modules.items():
            n = heads.heads_for(name)
            if n is not None and module.out_features % (2 * n):
                return None
        return heads

    def _describe(self) -> AdapterInfo:
        groups, full = self._group()
        names = self._names([*groups, *full])
        modules = {}
        for stem, keys in sorted(groups.items()):
            module = names.get(stem)
            if module is None:
                self.findings.append(error("unknown-name", f"GGUF tensor {stem!r} maps to no module of {self.arch}"))
                continue
            info = self._module(module, stem, keys)
            if info is not None:
                modules[module] = info
                self.module_of.update({k: module for k in keys.values()})
        record = (
            lineage.decode({lineage.METADATA_KEY: v}) if isinstance(v := self.fields.get(RECORD_KEY), str) else None
        )
        return AdapterInfo(
            path=self.path,
            format=NAME,
            files=(self.path,),
            modules=recorded_layout(modules, record),
            full_tensors={names[k]: FullTensorInfo(k, *self._entry(k)) for k in full if k in names},
            base_model=_str(self.fields.get("general.base_model.0.name")) or (record.base_model if record else None),
            record=record,
            config={k: v for k, v in self.fields.items() if isinstance(v, (str, int, float, bool))},
            findings=tuple(self.findings),
        )

    def _group(self) -> tuple[dict[str, dict[str, str]], list[str]]:
        groups: dict[str, dict[str, str]] = {}
        full = []
        for t in self.reader.tensors:
            suffix = tensor_name(t.name, self.path)[-len(".lora_a") :]
            if suffix in _ROLES:
                stem = t.name[: -len(suffix)].removesuffix(".weight")
                groups.setdefault(stem, {})[_ROLES[suffix]] = t.name
            elif "_norm" in t.name and len(t.shape) == 1:
                full.append(t.name)
            else:
                self.findings.append(error("unknown-key", f"tensor {t.name!r} is neither lora_a, lora_b nor a norm"))
        return groups, full

    def _names(self, stems: list[str]) -> dict[str, str]:
        config = base_config(self.options.base)
        try:
            tmap = gguf_names.name_map(self.arch, gguf_names.block_count(stems, config))
        except FormatError as e:
            raise FormatError(e.message, hint=e.hint, path=self.path) from None
        recorded = self.fields.get(MODULES_KEY)
        recorded_map = parse_json(recorded, MODULES_KEY, self.path) if isinstance(recorded, str) else {}
        if not isinstance(recorded_map, dict):
            raise FormatError(f"{MODULES_KEY} is not a JSON object", path=self.path)
        names, warnings = gguf_names.from_gguf(tmap, stems, _base_names(self.options.base), recorded_map)
        self.findings += [Finding("guessed-names", "warning", w) for w in warnings]
        return names

    def _module(self, module: str, stem: str, keys: dict[str, str]) -> ModuleInfo | None:
        missing = {"A", "B"} - keys.keys()
        if missing:
            self.findings.append(
                error("missing-a" if "A" in missing else "missing-b", "lora_a without lora_b or vice versa", module)
            )
            return None
        (a_dtype, a), (b_dtype, b) = self._entry(keys["A"]), self._entry(keys["B"])
        embedding = stem == EMBEDDING
        if embedding:
            a = (a[1], a[0])
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] == 0:
            self.findings.append(error("rank-mismatch", f"lora_a is {list(a)} but lora_b is {list(b)}", module))
            return None
        rank = a[0]
        return ModuleInfo(
            kind="embedding" if embedding else "linear",
            rank=rank,
            in_features=a[1],
            out_features=b[0],
            scale=self.alpha / rank if self.alpha else 1.0,
            alpha=self.alpha if self.alpha else None,
            scale_rule="alpha/r" if self.alpha else "unit",
            fan_in_fan_out=False,
            keys=keys,
            shapes={"A": a, "B": b},
            dtypes={"A": a_dtype, "B": b_dtype},
        )

    def _entry(self, key: str) -> tuple[str, tuple[int, ...]]:
        t = self.tensors[key]
        return t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))


def _open(path: Path) -> GGUFReader:
    magic = _magic(path)
    if magic in LEGACY_MAGICS:
        raise FormatError(
            "legacy llama.cpp LoRA file (magic 'ggla'); current llama.cpp cannot load it",
            path=path,
            hint="convert the original PEFT adapter again (loractl convert ADAPTER --to gguf)",
        )
    gguf = gguf_names.require_gguf()
    try:
        reader: GGUFReader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py parsing a hostile file: any failure is the file's
        raise FormatError(f"not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})", path=path) from None
    fields = _fields(reader, path)
    value = fields.get("general.type", "model")
    if value != "adapter":
        raise FormatError(
            f"GGUF file of type {value!r}, not an adapter",
            path=path,
            hint="this is a model file; loractl reads GGUF LoRA adapters (general.type = adapter)",
        )
    if fields.get("adapter.type", "lora") != "lora":
        raise FormatError(f"GGUF adapter of type {fields['adapter.type']!r}, not lora", path=path)
    return reader


def _fields(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """The KV pairs' values; gguf-py decodes them lazily, so undecodable strings surface here."""
    try:
        return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, IndexError, TypeError) as e:
        raise FormatError(f"unreadable GGUF metadata ({type(e).__name__}: {str(e)[:120]})", path=path) from None


def _to_torch(t: ReaderTensor) -> torch.Tensor:
    """A tensor's data in numpy order, bit for bit for F32/F16/BF16, dequantized to float32 otherwise."""
    import numpy as np
    import torch

    gguf = gguf_names.require_gguf()
    shape = tuple(int(n) for n in reversed(t.shape))
    kind = t.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(t.data).reshape(shape))
    if kind == gguf.GGMLQuantizationType.BF16:
        raw = np.array(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, kind), dtype=np.float32).reshape(shape))


def _base_names(base: Path | None) -> list[str] | None:
    """The base checkpoint's tensor names, when `base` has weights (a config-only directory gives None)."""
    if base is None:
        return None
    from ...io.checkpoint import Checkpoint

    try:
        with Checkpoint(base) as ckpt:
            return ckpt.names
    except FormatError:
        return None


def _magic(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
