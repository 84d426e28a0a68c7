"""torchtune native LoRA checkpoints (FORMATS.md §6): `adapter_model.pt` in torchtune's module names.

Keys are `layers.{i}.attn.{q_proj,k_proj,v_proj,output_proj}.lora_a.weight` (r, in) and
`.lora_b.weight` (out, r), `layers.{i}.mlp.{w1,w2,w3}.…`, `output.…`, DoRA `….magnitude`
(out,). The scale is `lora_alpha / r` with one alpha and one rank for the whole model,
stored not in the checkpoint but in the recipe (and in the `adapter_config.json` torchtune
writes beside it): `--alpha` otherwise. q/k rows (B and magnitude) are in Meta's RoPE order;
the permutation needs the head counts of `--base`'s config.json. The `.pt` is a pickle:
read only with `--allow-pickle`. A directory is read as torchtune only when it has the native
file but no PEFT export (torchtune writes both; the PEFT one is then preferred).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, UsageError
from ..findings import Finding, error
from ..info import AdapterInfo, ModuleInfo
from ..io.values import finite_number, load_json
from ._modules import no_weights_in
from ._rope import RopeHeads, base_config, hf_to_meta, is_rope_module, meta_to_hf
from ._state_dict import load_entries, save_pickle, sniff_keys
from .options import Feature, ReadOptions, WriteOptions, filled
from .peft.config import json_number

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter

NAME = "torchtune"
HOLDS: frozenset[Feature] = frozenset({"dora"})
FILLS = frozenset({"alpha"})
WEIGHTS_NAME = "adapter_model.pt"
CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(layers\.\d+\.(?:attn|mlp)\.\w+|output)\.(lora_a\.weight|lora_b\.weight|magnitude)$")
_ROLES = {"lora_a.weight": "A", "lora_b.weight": "B", "magnitude": "magnitude"}
# torchtune's names ↔ Hugging Face Llama's (convert_weights._FROM_HF), per layer.
_TO_HF = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
_FROM_HF = {v: k for k, v in _TO_HF.items()}
_DEFAULT = ReadOptions()


def detect(path: Path) -> bool:
    """A state dict with torchtune LoRA keys, or a directory holding one without a PEFT export."""
    if path.is_dir():
        return _native_file(path) is not None and not any((path / n).is_file() for n in PEFT_WEIGHTS)
    keys = sniff_keys(path)
    return keys is not None and any(_KEY.match(k) for k in keys)


def describe(path: Path, options: ReadOptions = _DEFAULT) -> AdapterInfo:
    """Modules and scales (a pickle must be loaded for its shapes: `--allow-pickle`)."""
    return _parse(path, options)[0]


def read(path: Path, options: ReadOptions = _DEFAULT) -> Adapter:
    """Load the adapter in Hugging Face names and q/k row order."""
    from ._reading import adapter_from_info

    info, tensors = _parse(path, options)
    heads = _heads(info, options.base)
    module_of = {key: module for module, m in info.modules.items() for key in m.keys.values()}

    def get(key: str) -> torch.Tensor:
        n = heads.heads_for(module_of[key]) if heads and not key.endswith("lora_a.weight") else None
        return meta_to_hf(tensors[key], n) if n else tensors[key]

    return adapter_from_info(info, get)


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write the directory `path` with `adapter_model.pt` and torchtune's `adapter_config.json`."""

    from ..io.atomic import atomic_output
    from ._global_alpha import common_alpha, fold_to_alpha, max_rank

    options = options or WriteOptions()
    kept = _holdable(adapter)
    rank = max_rank(kept)
    alpha = options.alpha if options.alpha is not None else common_alpha(kept, rank)
    stored = fold_to_alpha(kept, alpha, rank)
    heads = _heads_for_write(stored, options.base)
    state = _native_state(stored, heads)
    config = {
        "r": rank,
        "lora_alpha": json_number(alpha),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in stored.modules}),
        "peft_type": "LORA",
        "base_model_name_or_path": stored.meta.base_model,
    }
    with atomic_output(path, force=force) as tmp:
        tmp.mkdir()
        save_pickle(tmp / WEIGHTS_NAME, state)
        (tmp / CONFIG_NAME).write_text(json.dumps(config) + "\n")
    return path


def hf_module(native: str) -> str:
    """`layers.0.attn.q_proj` → `model.layers.0.self_attn.q_proj`; `output` → `lm_head`."""
    if native == "output":
        return "lm_head"
    _, i, rest = native.split(".", 2)
    return f"model.layers.{i}.{_TO_HF.get(rest, rest)}"


def native_module(module: str) -> str | None:
    """The inverse of `hf_module`; None for modules torchtune has no LoRA for."""
    if module == "lm_head":
        return "output"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+\.\w+)", module)
    return f"layers.{m[1]}.{_FROM_HF[m[2]]}" if m and m[2] in _FROM_HF else None


def _parse(path: Path, options: ReadOptions) -> tuple[AdapterInfo, dict[str, torch.Tensor]]:
    file = _native_file(path) if path.is_dir() else path
    if file is None:
        raise no_weights_in(path, WEIGHTS_NAME)
    config = _config(file.parent / CONFIG_NAME)
    tensors, _ = load_entries(file, options.allow_pickle)
    alpha = filled(options.alpha, config.get("lora_alpha"), "--alpha", file)
    if alpha is None:
        raise UsageError(
            "torchtune native checkpoints do not store lora_alpha: pass --alpha",
            path=file,
            hint="pass --alpha with the recipe's lora_alpha (or keep adapter_config.json beside the .pt)",
        )
    findings: list[Finding] = []
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _KEY.match(key)
        if m:
            groups.setdefault(hf_module(m[1]), {})[_ROLES[m[2]]] = key
        else:
            findings.append(error("unknown-key", f"tensor {key!r} is not a torchtune LoRA tensor"))
    modules = {}
    for module, keys in sorted(groups.items()):
        found = _module_info(module, keys, tensors, finite_number(alpha, "lora_alpha", file), findings)
        if found:
            modules[module] = found
    info = AdapterInfo(
        path=file,
        format=NAME,
        files=(file,),
        modules=modules,
        full_tensors={},
        base_model=config.get("base_model_name_or_path"),
        config=config,
        findings=tuple(findings),
    )
    return info, tensors


def _module_info(
    module: str, keys: dict[str, str], tensors: dict[str, torch.Tensor], alpha: float, findings: list[Finding]
) -> ModuleInfo | None:
    if "A" not in keys or "B" not in keys:
        findings.append(error("missing-factor", "lora_a and lora_b must both be present", module))
        return None
    shapes = {role: tuple(tensors[k].shape) for role, k in keys.items()}
    a, b = shapes["A"], shapes["B"]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] == 0:
        findings.append(error("rank-mismatch", f"lora_a is {list(a)} but lora_b is {list(b)}", module))
        return None
    from ..io.tensor_bytes import dtype_code

    return ModuleInfo(
        kind="linear",
        rank=a[0],
        in_features=a[1],
        out_features=b[0],
        scale=alpha / a[0],
        alpha=alpha,
        scale_rule="alpha/r",
        fan_in_fan_out=False,
        keys=keys,
        shapes=shapes,
        dtypes={role: dtype_code(tensors[k].dtype) for role, k in keys.items()},
    )


def _native_file(root: Path) -> Path | None:
    if (root / WEIGHTS_NAME).is_file():
        return root / WEIGHTS_NAME
    old = sorted(root.glob("adapter_*.pt"), key=lambda p: int(m[1]) if (m := re.search(r"(\d+)", p.stem)) else -1)
    return old[-1] if old else None  # the pre-2024-12 layout: adapter_{epoch}.pt, the latest epoch


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    doc = load_json(path)
    return doc if isinstance(doc, dict) else {}


def _heads(info: AdapterInfo, base: Path | None) -> RopeHeads | None:
    if not any(map(is_rope_module, info.modules)):
        return None
    config = base_config(base)
    if config is None:
        raise UsageError(
            "torchtune keeps q/k LoRA rows in Meta's RoPE order; converting them needs the head counts",
            path=info.path,
            hint="pass --base with the base model's directory (its config.json)",
        )
    return RopeHeads.from_config(config)


def _heads_for_write(adapter: Adapter, base: Path | None) -> RopeHeads | None:
    if not any(map(is_rope_module, adapter.modules)):
        return None
    config = base_config(base)
    if config is None:
        raise UsageError(
            "torchtune wants q/k LoRA rows in Meta's RoPE order, which needs the head counts",
            hint="pass --base with the base model's directory (its config.json)",
        )
    return RopeHeads.from_config(config)


def _holdable(adapter: Adapter) -> Adapter:
    """The linear modules with torchtune names, without what torchtune cannot hold (bias, full tensors)."""
    modules = {}
    for name, m in adapter.modules.items():
        if m.kind != "linear":
            continue
        if native_module(name) is None:
            raise AdapterError(
                f"module {name!r} has no torchtune name",
                hint="torchtune's LoRA covers the attention projections, the MLP and the output head",
            )
        modules[name] = replace(m, bias=None, fan_in_fan_out=False)
    return replace(adapter, modules=modules, full_tensors={})


def _native_state(adapter: Adapter, heads: RopeHeads | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in sorted(adapter.modules.items()):
        native = native_module(name)
        n = heads.heads_for(name) if heads else None
        state[f"{native}.lora_a.weight"] = m.A.contiguous()
        state[f"{native}.lora_b.weight"] = (hf_to_meta(m.B, n) if n else m.B).contiguous()
        if m.magnitude is not None:
            state[f"{native}.magnitude"] = (hf_to_meta(m.magnitude, n) if n else m.magnitude).contiguous()
    return state
