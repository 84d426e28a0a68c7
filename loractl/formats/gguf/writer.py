"""Writing GGUF LoRA adapters the way llama.cpp's `convert_lora_to_gguf.py` does (FORMATS.md §5, §11.1).

The file holds one alpha, so per-module scales are folded into B against it (`_global_alpha`);
ranks stay per module. The architecture and head counts come from `--base`'s config.json
(or from a GGUF the adapter was read from). What GGUF cannot hold (DoRA magnitudes, lora
biases, conv modules, full tensors other than norms) is left out: the format's `HOLDS` says
so, and `convert` lists it as lost. GPT-2's Conv1D flag changes no factor: loractl's record keeps it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ... import lineage
from ...adapter import Adapter, LoraModule
from ...errors import AdapterError, UsageError
from ...io.atomic import atomic_output
from .._global_alpha import common_alpha, fold_to_alpha
from .._record import record_for
from .._rope import RopeHeads, base_config, hf_to_meta, is_rope_module
from ..options import WriteOptions
from . import names as gguf_names
from .names import EMBEDDING, HEADS_KEY, MODULES_KEY, RECORD_KEY

if TYPE_CHECKING:
    import numpy as np
    from gguf import TensorNameMap

_STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Target:
    """Where the adapter goes: the GGUF architecture, its name map and the q/k head counts."""

    arch: str
    tmap: TensorNameMap
    heads: RopeHeads | None


def write_gguf(adapter: Adapter, path: Path, *, force: bool, options: WriteOptions) -> Path:
    """Write `adapter` to the file `path` atomically; returns `path`."""
    gguf = gguf_names.require_gguf()
    config = base_config(options.base)
    target = _target(adapter, config)
    stored = stored_form(adapter, options.alpha, target.tmap)
    names = _module_names(stored, target.tmap)
    full = _full_names(stored, target.tmap)
    alpha = next(iter(stored.modules.values())).alpha if stored.modules else options.alpha or 1.0
    with atomic_output(path, force=force) as tmp:
        writer = gguf.GGUFWriter(tmp, target.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha or 1.0))
        if stored.meta.base_model:
            writer.add_uint32("general.base_model.count", 1)
            writer.add_string("general.base_model.0.name", stored.meta.base_model)
        writer.add_string(RECORD_KEY, lineage.encode(record_for(stored, {})))
        writer.add_string(MODULES_KEY, json.dumps({v: k for k, v in {**names, **full}.items()}, sort_keys=True))
        if target.heads:
            writer.add_array(HEADS_KEY, [target.heads.n_heads, target.heads.n_kv_heads])
        for name, module in sorted(stored.modules.items()):
            for key, t in _lora_tensors(names[name], name, module, target.heads):
                _add(writer, key, t)
        for name, key in sorted(full.items()):
            _add(writer, key, stored.full_tensors[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def stored_form(adapter: Adapter, alpha: float | None, tmap: TensorNameMap) -> Adapter:
    """`adapter` exactly as a GGUF file holds it (and reads back): one float32 alpha, nothing GGUF lacks."""
    import numpy as np

    modules = {n: _plain(m) for n, m in adapter.modules.items() if m.kind in ("linear", "embedding")}
    norms = {k: _cast_full(adapter.full_tensors[k]) for k in _full_names(adapter, tmap)}
    kept = replace(adapter, modules=modules, full_tensors=norms)
    chosen = alpha if alpha is not None else common_alpha(kept)
    folded = fold_to_alpha(kept, float(np.float32(chosen)))
    return replace(folded, modules={n: _cast(m) for n, m in folded.modules.items()})


def _plain(m: LoraModule) -> LoraModule:
    return replace(m, magnitude=None, bias=None)


def _cast(m: LoraModule) -> LoraModule:
    if m.A.dtype in _STORED_DTYPES and m.B.dtype == m.A.dtype:
        return m
    return replace(m, A=m.A.float(), B=m.B.float())


def _cast_full(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _STORED_DTYPES else t.float()


def _target(adapter: Adapter, config: dict[str, Any] | None) -> _Target:
    recorded = adapter.meta.extra.get("gguf") or {}
    arch = gguf_names.arch_from_config(config) if config else recorded.get("architecture")
    if not arch:
        raise UsageError(
            "writing GGUF needs the base model's architecture",
            hint="pass --base with the base model's directory (its config.json)",
        )
    tmap = gguf_names.name_map(arch, gguf_names.block_count(list(adapter.modules), config))
    heads = None
    if arch in gguf_names.PERMUTED_ARCHS and any(map(is_rope_module, adapter.modules)):
        if config:
            heads = RopeHeads.from_config(config)
        elif isinstance(r := recorded.get("rope_heads"), list) and len(r) == 2:
            heads = RopeHeads(int(r[0]), int(r[1]))
        else:
            raise UsageError(
                f"{arch} q/k LoRA rows must be permuted to llama.cpp's RoPE order, which needs the head counts",
                hint="pass --base with the base model's directory (its config.json)",
            )
    return _Target(arch, tmap, heads)


def _module_names(adapter: Adapter, tmap: TensorNameMap) -> dict[str, str]:
    out = {}
    for module in adapter.modules:
        stem = gguf_names.to_gguf(tmap, module)
        if stem is None:
            raise AdapterError(
                f"module {module!r} has no GGUF name in gguf-py's map for this architecture",
                hint="llama.cpp can only apply LoRA to tensors of its own model graph",
            )
        out[module] = stem
    if len(set(out.values())) < len(out):
        raise AdapterError("two modules map to the same GGUF tensor", hint="check the module names with inspect")
    return out


def _full_names(adapter: Adapter, tmap: TensorNameMap) -> dict[str, str]:
    """GGUF names of the full tensors llama.cpp's converter keeps in an adapter: 1-D norms (mergekit-extract-lora);
    llama.cpp itself skips them at load (`validate --target llamacpp` says so)."""
    out = {}
    for key, t in adapter.full_tensors.items():
        mapped = gguf_names.full_tensor_to_gguf(tmap, key)
        if mapped is not None and "_norm" in mapped and t.ndim == 1:
            out[key] = mapped
    return out


def _lora_tensors(stem: str, module: str, m: LoraModule, heads: RopeHeads | None) -> list[tuple[str, torch.Tensor]]:
    a = m.A.T if stem == EMBEDDING else m.A
    b = m.B
    n = heads.heads_for(module) if heads else None
    if n:
        b = hf_to_meta(b, n)
    return [(f"{stem}.weight.lora_a", a), (f"{stem}.weight.lora_b", b)]


def _add(writer: Any, key: str, t: torch.Tensor) -> None:
    gguf = gguf_names.require_gguf()
    array, raw = _numpy(t.detach().contiguous())
    writer.add_tensor(key, array, raw_dtype=gguf.GGMLQuantizationType.BF16 if raw else None)


def _numpy(t: torch.Tensor) -> tuple[np.ndarray[Any, Any], bool]:
    """The tensor as numpy; bfloat16 as its raw 16-bit patterns (True: tell gguf-py it is BF16)."""
    import numpy as np

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).copy(), True
    return t.numpy().copy(), False
