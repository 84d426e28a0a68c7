"""GGUF tensor names ↔ module paths, through gguf-py's own name maps (FORMATS.md §5.1).

Writing maps a module path (`model.layers.0.self_attn.q_proj`) to llama.cpp's name
(`blk.0.attn_q`) with `gguf.get_tensor_name_map(arch, n_blocks)`. Reading inverts it: with
the base checkpoint's tensor names when `--base` gives them (exact), else with the names
loractl recorded in the file, else by choosing among the map's candidates the Hugging Face
transformers spelling (`model.layers.N...`, `model.embed_tokens`, `lm_head`), with a warning.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ...errors import FormatError, UsageError
from ...extras import require_extra

if TYPE_CHECKING:
    from gguf import TensorNameMap

# loractl's own GGUF metadata keys (llama.cpp ignores KV pairs it does not know) and the embedding's
# tensor stem: shared by the reader and the writer.
RECORD_KEY = "loractl.record"
MODULES_KEY = "loractl.modules"
HEADS_KEY = "loractl.rope_heads"
EMBEDDING = "token_embd"
# HF model_type → GGUF architecture where convert_hf_to_gguf.py registers the model under another name.
_ARCH_ALIASES = {"mistral": "llama", "mixtral": "llama"}
# Architectures whose converter applies `LlamaModel.permute` to q/k rows (LlamaModel and its subclasses).
PERMUTED_ARCHS = frozenset({"llama", "granite", "granitemoe", "deci", "minicpm"})
_BLOCK = re.compile(r"\.(\d{1,9})\.")  # a longer digit run is no layer index
MAX_BLOCKS = 4096  # layers: the deepest models have a few hundred, and gguf-py maps each one


def require_gguf() -> ModuleType:
    """The `gguf` package, or a `UsageError` saying how to install it."""
    require_extra("gguf", purpose="GGUF support")
    import gguf

    return gguf


def arch_from_config(config: dict[str, Any]) -> str:
    """The GGUF architecture name of a Hugging Face config.json."""
    gguf = require_gguf()
    text = config.get("text_config")
    model_type = str((text if isinstance(text, dict) and "model_type" in text else config).get("model_type", ""))
    arch = _ARCH_ALIASES.get(model_type, model_type)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise UsageError(
            f"model type {model_type or '(none)'!r} has no GGUF architecture in gguf-py",
            hint="check that the base given is the adapter's base model",
        )
    return arch


def name_map(arch: str, n_blocks: int) -> TensorNameMap:
    """gguf-py's name map for `arch` with blocks 0..n_blocks-1."""
    gguf = require_gguf()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise FormatError(f"architecture {arch!r} is unknown to gguf-py", hint="upgrade the gguf package")
    tmap: TensorNameMap = gguf.get_tensor_name_map(by_name[arch], n_blocks)
    return tmap


def block_count(names: list[str], config: dict[str, Any] | None = None) -> int:
    """Enough blocks for every index in `names` (module paths or GGUF names), at least the config's."""
    found = [int(m) for n in names for m in _BLOCK.findall(f".{n}.")]
    layers = (config or {}).get("num_hidden_layers")
    configured = layers if isinstance(layers, int) and not isinstance(layers, bool) else 0
    count = max([configured, *(i + 1 for i in found)], default=1) or 1
    if count > MAX_BLOCKS:
        raise FormatError(
            f"block index {count - 1} is beyond the cap of {MAX_BLOCKS} layers",
            hint="`blk.N` indices are the base model's layers: this file names a layer no model has",
        )
    return count


def to_gguf(tmap: TensorNameMap, module: str) -> str | None:
    """`model.layers.0.self_attn.q_proj` → `blk.0.attn_q`; None when the map has no such tensor."""
    return tmap.get_name(module)


def full_tensor_to_gguf(tmap: TensorNameMap, key: str) -> str | None:
    """`model.norm.weight` → `output_norm.weight`; None when unmapped."""
    return tmap.get_name(key, try_suffixes=(".weight", ".bias"))


def from_gguf(
    tmap: TensorNameMap, names: list[str], base_names: list[str] | None, recorded: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Module paths for GGUF base names (`blk.0.attn_q`, `output_norm.weight`), and any warnings.

    Names neither the base, nor the record, nor the map can resolve are left out.
    """
    if base_names is not None:
        known = _from_base(tmap, base_names)
        return {n: known[n] for n in names if n in known}, []
    out = {n: recorded[n] for n in names if n in recorded}
    guessed = _guess(tmap, [n for n in names if n not in out])
    warnings = []
    if guessed:
        sample = next(iter(guessed.values()))
        warnings.append(
            f"module names guessed from gguf-py's name map (e.g. {sample!r}); "
            "pass --base to take them from the base checkpoint"
        )
    return out | guessed, warnings


def _from_base(tmap: TensorNameMap, base_names: list[str]) -> dict[str, str]:
    out = {}
    for key in base_names:
        mapped = full_tensor_to_gguf(tmap, key)
        if mapped is None:
            continue
        out[mapped] = key
        if key.endswith(".weight") and mapped.endswith(".weight"):
            out[mapped[: -len(".weight")]] = key[: -len(".weight")]
    return out


def _guess(tmap: TensorNameMap, names: list[str]) -> dict[str, str]:
    candidates: dict[str, list[str]] = {}
    for hf, (_, gguf_name) in tmap.mapping.items():
        if hf != gguf_name:
            candidates.setdefault(gguf_name, []).append(hf)
    out = {}
    for name in names:
        stem, suffix = (name[: -len(".weight")], ".weight") if name.endswith(".weight") else (name, "")
        options = candidates.get(stem)
        if options:
            out[name] = min(options, key=_transformers_first) + suffix
    return out


def _transformers_first(hf: str) -> int:
    if hf == "lm_head" or hf.startswith("model.layers."):
        return 0
    return 1 if hf.startswith("model.") else 2
