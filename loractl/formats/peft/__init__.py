"""Hugging Face PEFT: `adapter_config.json` + `adapter_model.safetensors` (FORMATS.md §1).

Keys are `base_model.model.<module>.lora_A.weight` etc.; files without the prefix
(transformers' integration) read the same. Everything that is not a LoRA factor is a
full tensor (modules_to_save, implicit classifier heads, `base_layer` weights).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import lineage
from ...errors import FormatError, PickleRefusedError
from ...findings import Finding, error, warning
from ...info import AdapterInfo, FullTensorInfo, ModuleInfo, ScaleRule, scale_from_alpha
from ...io.safetensors_header import read_header
from ...io.values import load_json
from .._modules import exact_scales, module_info
from ..options import ReadOptions, WriteOptions
from .config import check_config, is_saved_module, module_alpha_rank

if TYPE_CHECKING:
    import torch

    from ...adapter import Adapter

NAME = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
ROLE_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
_DEFAULT = ReadOptions()
_LORA_LIKE = re.compile(r"\.(lora_|hada_|lokr_|oft_|boft_|ia3_)")


def detect(path: Path) -> bool:
    """A directory (or a file inside one) with a PEFT adapter_config.json."""
    config = _root(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        doc = load_json(config)
    except FormatError:
        return True  # claims to be PEFT; `describe` reports the broken (or oversized) config
    return isinstance(doc, dict) and ("peft_type" in doc or "lora_alpha" in doc or "r" in doc)


def describe(path: Path, options: ReadOptions = _DEFAULT) -> AdapterInfo:
    """Parse config and header; tensor data is not read (except for legacy pickles)."""
    root = _root(path)
    config = _read_config(root / CONFIG_NAME)
    weights = _weights_file(root, options.allow_pickle)
    if weights.suffix == ".safetensors":
        header = read_header(weights)
        entries = {k: (t.dtype, t.shape) for k, t in header.tensors.items()}
        record = lineage.decode(header.metadata)
    else:
        entries = {k: (_code(t), tuple(t.shape)) for k, t in _load_pickle(weights).items()}
        record = None
    return _layout(root, config, entries, record, (root / CONFIG_NAME, weights))


def read(path: Path, options: ReadOptions = _DEFAULT) -> Adapter:
    """Load the adapter; raises `AdapterError` on the first structural error."""
    from .._reading import adapter_from_info

    info = describe(path, options)
    weights = info.files[1]
    if weights.suffix == ".safetensors":
        from ...io.checkpoint import Checkpoint

        with Checkpoint(weights) as ckpt:
            return adapter_from_info(info, ckpt.get)
    tensors = _load_pickle(weights)
    return adapter_from_info(info, tensors.__getitem__)


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write `path/adapter_config.json` and `path/adapter_model.safetensors` atomically."""
    from ...io.atomic import atomic_output
    from .writer import peft_config, peft_record, peft_tensors

    config, scales = peft_config(adapter)
    metadata = {"format": "pt", lineage.METADATA_KEY: lineage.encode(peft_record(adapter, scales))}
    from ...io.safetensors_writer import save_tensors

    with atomic_output(path, force=force) as tmp:
        tmp.mkdir()
        save_tensors(tmp / WEIGHTS_NAME, peft_tensors(adapter), metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _root(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _read_config(path: Path) -> dict[str, Any]:
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise FormatError("config is not a JSON object", path=path)
    peft_type = doc.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise FormatError(f"PEFT type {peft_type} is not LoRA", path=path, hint="loractl handles LoRA adapters only")
    check_config(doc, path)
    return doc


def _weights_file(root: Path, allow_pickle: bool) -> Path:
    if (root / WEIGHTS_NAME).is_file():
        return root / WEIGHTS_NAME
    if (root / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise PickleRefusedError(
                f"weights are a pickle ({PICKLE_NAME}); loractl does not unpickle by default",
                path=root / PICKLE_NAME,
                hint="pass --allow-pickle if you trust the file (it is loaded with weights_only=True)",
            )
        return root / PICKLE_NAME
    raise FormatError(f"no {WEIGHTS_NAME} beside {CONFIG_NAME}", path=root)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The legacy `adapter_model.bin` (reached only with allow_pickle: `_weights_file` refuses it otherwise)."""
    import torch

    from .._state_dict import load_pickle

    obj = load_pickle(path, allow_pickle=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError("pickle does not hold a dict of tensors", path=path)
    return {str(k): v for k, v in obj.items()}


def _code(t: torch.Tensor) -> str:
    from ...io.tensor_bytes import dtype_code

    return dtype_code(t.dtype)


def _layout(
    root: Path,
    config: dict[str, Any],
    entries: dict[str, tuple[str, tuple[int, ...]]],
    record: lineage.Record | None,
    files: tuple[Path, Path],
) -> AdapterInfo:
    """Group keys into modules, resolve scales, and collect every structural problem."""
    findings: list[Finding] = []
    roles: dict[str, dict[str, str]] = {}
    full: dict[str, FullTensorInfo] = {}
    for key, (dtype, shape) in entries.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        role, module = _split_role(name)
        if role:
            roles.setdefault(module, {})[role] = key
        elif _LORA_LIKE.search(name):
            findings.append(
                warning("unknown-key", f"tensor {key!r} is not a LoRA factor loractl knows; kept as a full tensor")
            )
            full[name] = FullTensorInfo(key, dtype, shape)
        else:
            full[name.replace(".base_layer.", ".")] = FullTensorInfo(key, dtype, shape)
    modules = {}
    for module, keys in sorted(roles.items()):
        info = _module_info(module, keys, entries, config, record, findings)
        if info:
            modules[module] = info
    modules = exact_scales(modules, record)
    findings += _config_findings(config, modules, full)
    return AdapterInfo(
        path=root,
        format=NAME,
        files=files,
        modules=modules,
        full_tensors=full,
        base_model=config.get("base_model_name_or_path") or (record.base_model if record else None),
        base_revision=config.get("revision") or (record.base_revision if record else None),
        task_type=config.get("task_type"),
        record=record,
        config=config,
        findings=tuple(findings),
    )


def _split_role(name: str) -> tuple[str | None, str]:
    for suffix, role in ROLE_SUFFIXES.items():
        if name.endswith(suffix):
            return role, name[: -len(suffix)]
    return None, name


def _module_info(
    module: str,
    keys: dict[str, str],
    entries: dict[str, tuple[str, tuple[int, ...]]],
    config: dict[str, Any],
    record: lineage.Record | None,
    findings: list[Finding],
) -> ModuleInfo | None:
    """The shared factor checks, then PEFT's own: scale from the config's patterns, `r` agreement, orientation."""
    if record and module in record.padded_bias:
        keys = {role: key for role, key in keys.items() if role != "bias"}
    rslora = bool(config.get("use_rslora"))
    alpha, config_rank = module_alpha_rank(config, module)
    rule: ScaleRule = "alpha/sqrt(r)" if rslora else "alpha/r"
    embedding = keys.get("A", "").endswith("lora_embedding_A")
    info = module_info(
        module, keys, entries, lambda r: (scale_from_alpha(alpha, r, rslora), alpha, rule), findings,
        kind="embedding" if embedding else None,
    )  # fmt: skip
    if info is None:
        return None
    if config_rank != info.rank:
        findings.append(
            error("config-rank", f"config says r={config_rank} but the tensors have rank {info.rank}", module)
        )
    return replace(info, fan_in_fan_out=_fan_in_fan_out(module, config, record, info.kind == "linear"))


def _fan_in_fan_out(module: str, config: dict[str, Any], record: lineage.Record | None, linear: bool) -> bool:
    """The config's one flag applies to linear modules; loractl's record names the modules that differ."""
    implied = bool(config.get("fan_in_fan_out")) and linear
    return record.fan_in_fan_out.get(module, implied) if record else implied


def _config_findings(
    config: dict[str, Any], modules: dict[str, ModuleInfo], full: dict[str, FullTensorInfo]
) -> list[Finding]:
    out = []
    dora = [m for m, i in modules.items() if i.dora]
    if config.get("use_dora") and len(dora) < len(modules):
        missing = next(m for m, i in modules.items() if not i.dora)
        out.append(error("dora-magnitude", "config has use_dora but the module has no lora_magnitude_vector", missing))
    if dora and not config.get("use_dora"):
        out.append(error("dora-config", "lora_magnitude_vector present but config lacks use_dora", dora[0]))
    biased = [m for m, i in modules.items() if i.bias]
    if biased and not config.get("lora_bias"):
        out.append(error("bias-config", "lora_B.bias present but config lacks lora_bias", biased[0]))
    for name, t in full.items():
        explained = is_saved_module(config, name) or ".base_layer." in t.key or config.get("bias", "none") != "none"
        if not explained and not _LORA_LIKE.search(name):
            out.append(warning("unknown-key", f"full tensor {t.key!r} is not explained by modules_to_save"))
    return out
