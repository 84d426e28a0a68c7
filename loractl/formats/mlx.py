"""mlx-lm adapters: `adapters.safetensors` + `adapter_config.json`, and old mlx-examples `.npz` (FORMATS.md §4).

Factors are stored transposed: `lora_a` is Aᵀ (in, r), `lora_b` is Bᵀ (r, out); DoRA adds
`m` (out,). The scale is one absolute multiplier, `lora_parameters.scale`; the `alpha` key
old configs carry was never used by mlx-lm and is ignored. Files without a config (old
`.npz`, a bare `adapters.safetensors`) store no scale: `--scale` is required for them.
Written: one global rank (smaller ranks zero-padded) and one global scale (per-module
ratios folded into B), as mlx-lm's loader requires; both folds are exact up to rounding.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import lineage
from ..errors import AdapterError, FormatError, UsageError
from ..findings import Finding, error, warning
from ..info import AdapterInfo, ModuleKind
from ..io.config_json import read_config
from ..io.safetensors_header import DTYPE_SIZES, is_safetensors, read_header
from ..io.values import finite_number, load_json, positive_int, tensor_name
from ._mlx_names import from_mlx, is_gpt2_conv1d, model_type, to_mlx
from ._modules import exact_scales, module_info
from ._state_dict import zip_entries
from .options import Feature, ReadOptions, WriteOptions, filled
from .peft.config import most_common

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter, LoraModule

NAME = "mlx"
HOLDS: frozenset[Feature] = frozenset({"dora", "embedding", "fan_in_fan_out"})  # Conv1D: GPT-2's mlx names
FILLS = frozenset({"scale"})
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
LEAVES = {"lora_a": "A", "lora_b": "B", "m": "magnitude"}
EMBEDDINGS = {"embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embedding"}  # LoRAEmbedding modules
_CONFIG_MARKERS = ("lora_parameters", "fine_tune_type", "lora_layers", "num_layers")
_MAX_NPZ_MEMBERS = 20_000  # an old mlx-examples .npz: two per module of a Llama or Mistral
_MAX_EXPANSION = 64  # unpacked / packed bytes of an .npz: random factors do not compress, zeros 1000-fold
_LAYER = re.compile(r"\.(?:layers|h)\.(\d{1,9})\.")  # a longer digit run is no layer index


def detect(path: Path) -> bool:
    """An mlx-lm adapter directory, an `.npz` of `*.lora_a/b`, or a bare safetensors of them."""
    config = _config(path)
    if config is not None:
        return any(k in config for k in _CONFIG_MARKERS)
    if not path.is_file():
        return False
    try:
        keys = list(_entries(path))
    except (FormatError, ValueError, OSError):
        return False
    return bool(keys) and all(k.rpartition(".")[2] in LEAVES for k in keys) and any(k.endswith(".lora_a") for k in keys)


def describe(path: Path, options: ReadOptions) -> AdapterInfo:
    """Group keys into modules (shapes un-transposed) and take the scale from the config or `--scale`."""
    config = _config(path) or {}
    weights = _weights(path)
    entries = _entries(weights)
    params = config.get("lora_parameters") or {}
    findings: list[Finding] = []
    scale = _scale(config, options, weights, findings)
    if "rank" in params:
        positive_int(params["rank"], "lora_parameters.rank", _root(path) / CONFIG_NAME)
    groups: dict[str, dict[str, str]] = {}
    for key in entries:
        module, _, leaf = key.rpartition(".")
        if leaf not in LEAVES:
            raise FormatError(f"tensor {key!r} is not an mlx LoRA leaf (lora_a, lora_b, m)", path=weights)
        groups.setdefault(module, {})[LEAVES[leaf]] = key
    modules = {}
    for module, keys in sorted(groups.items()):
        kind: ModuleKind | None = "embedding" if module.rpartition(".")[2] in EMBEDDINGS else None
        canonical = {k: (entries[k][0], _canonical_shape(k, entries[k][1], weights)) for k in keys.values()}
        info = module_info(module, keys, canonical, lambda r: (scale, None, "absolute"), findings, kind)
        if info is None:
            continue
        name, conv1d = from_mlx(module)
        if "rank" in params and params["rank"] != info.rank:
            findings.append(
                error("config-rank", f"config says rank {params['rank']}, tensors have {info.rank}", module)
            )
        modules[name] = replace(info, fan_in_fan_out=conv1d)
    record = lineage.decode(_metadata(weights))
    files = (weights, _root(path) / CONFIG_NAME) if config else (weights,)
    return AdapterInfo(
        path=_root(path) if config else weights,
        format=NAME,
        files=files,
        modules=exact_scales(modules, record),
        full_tensors={},
        base_model=config.get("model") if isinstance(config.get("model"), str) else None,
        record=record,
        config=config,
        findings=tuple(findings),
    )


def read(path: Path, options: ReadOptions) -> Adapter:
    """Load the adapter, transposing `lora_a`/`lora_b` back to A (r, in) / B (out, r)."""
    from ._reading import adapter_from_info

    info = describe(path, options)
    raw: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if not raw:  # loaded on first use: an adapter with structural errors is refused before any data is read
            raw.update(_load(info.files[0]))
        t = raw[key]
        return t.T.contiguous() if key.endswith((".lora_a", ".lora_b")) else t

    adapter = adapter_from_info(info, get)
    return replace(adapter, meta=replace(adapter.meta, extra={"mlx_config": info.config} if info.config else {}))


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write `path/adapters.safetensors` (one rank, one scale) and `path/adapter_config.json`."""
    from ..io.atomic import atomic_output
    from ..io.safetensors_writer import save_tensors
    from ._record import record_for

    options = options or WriteOptions()
    folded = fold(adapter)
    kind = model_type(options.base)
    names = {module: to_mlx(module, m.fan_in_fan_out, kind) for module, m in folded.modules.items()}
    tensors: dict[str, torch.Tensor] = {}
    for module, m in folded.modules.items():
        key = names[module]
        tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"] = m.A.T.contiguous(), m.B.T.contiguous()
        if m.magnitude is not None:
            tensors[f"{key}.m"] = m.magnitude
    metadata = {lineage.METADATA_KEY: lineage.encode(record_for(folded, {}))}
    config = _config_for(folded, adapter, list(names.values()), options)
    with atomic_output(path, force=force) as tmp:
        tmp.mkdir()
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def mlx_name(module: str, conv1d: bool, base: Path | None) -> str:
    """mlx-lm's path of a transformers module (GPT-2's and GPT-NeoX's differ; `_mlx_names`).

    Raises:
        AdapterError: a `transformer.h.N` module that only the base's `model_type` can place.
    """
    return to_mlx(module, conv1d, model_type(base))


def fold(adapter: Adapter) -> Adapter:
    """The adapter as mlx-lm holds it: every module at the largest rank and the most common scale.

    Zero-padding ranks is exact; folding s/s_global into B rounds once in B's dtype.
    """
    _refuse_unheld(adapter)
    mods = adapter.modules
    rank = max((m.rank for m in mods.values()), default=8)
    scale = most_common([m.scale for m in mods.values()], 20.0)
    out = {name: _fold_module(m, rank, scale) for name, m in mods.items()}
    return replace(adapter, modules=out)


def _fold_module(m: LoraModule, rank: int, scale: float) -> LoraModule:
    import torch

    pad = rank - m.rank
    a = torch.cat([m.A, m.A.new_zeros(pad, *m.A.shape[1:])]) if pad else m.A
    b = m.B if m.scale == scale else (m.B.double() * (m.scale / scale)).to(m.B.dtype)
    b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
    return replace(m, A=a, B=b, scale=scale, alpha=None, scale_rule="absolute")


def _refuse_unheld(adapter: Adapter) -> None:
    for module, m in adapter.modules.items():
        if m.kind == "conv" or m.bias is not None or (m.fan_in_fan_out and not is_gpt2_conv1d(module)):
            raise AdapterError(
                f"module {module!r}: mlx adapters cannot hold conv LoRA, lora bias or fan_in_fan_out (but GPT-2's)"
            )
    if len({m.magnitude is None for m in adapter.modules.values()}) > 1:
        raise AdapterError("mlx adapters are all DoRA or all LoRA, not a mix", hint="split the adapter first")
    if adapter.full_tensors:
        raise AdapterError("mlx adapters cannot hold full tensors", hint="use 'loractl convert'")


def _config_for(folded: Adapter, source: Adapter, names: list[str], options: WriteOptions) -> dict[str, Any]:
    """adapter_config.json: the source mlx config's training fields and schema (2024's `lora_layers` and
    `use_dora`, or `num_layers` and `fine_tune_type`), with the adapter's own numbers; `names` are mlx's."""
    mods = folded.modules
    first = next(iter(mods.values()), None)
    config = dict(source.meta.extra.get("mlx_config") or {})
    params = {k: v for k, v in (config.get("lora_parameters") or {}).items() if k not in ("alpha", "rank", "scale")}
    params |= {"rank": first.rank if first else 8, "scale": first.scale if first else 20.0}
    params.setdefault("dropout", 0.0)
    params["keys"] = sorted({_LAYER.split(m)[-1] if _LAYER.search(m) else m for m in names})
    config["lora_parameters"] = params
    dora = first is not None and first.magnitude is not None
    if "use_dora" in config and "fine_tune_type" not in config:
        config["use_dora"] = dora
    else:
        config["fine_tune_type"] = "dora" if dora else "lora"
    layers_key = "lora_layers" if "lora_layers" in config and "num_layers" not in config else "num_layers"
    config[layers_key] = _num_layers(names, options.base, config.get(layers_key))
    if source.meta.base_model and "model" not in config:
        config["model"] = source.meta.base_model
    return config


def _num_layers(modules: list[str], base: Path | None, previous: Any) -> int:
    """mlx-lm adapts the last N blocks: N = layers − first adapted layer, the layers counted by the base or,
    without one, up to the last adapted layer; an adapter of no numbered layer keeps the previous N (else all)."""
    indices = [int(m.group(1)) for m in map(_LAYER.search, modules) if m]
    if not indices:
        return previous if isinstance(previous, int) else -1
    total = _base_layers(base) if base is not None else None
    return (total if total is not None else max(indices) + 1) - min(indices)


def _base_layers(base: Path) -> int | None:
    try:
        doc = read_config(base)
    except FormatError:
        return None
    if doc is None:
        return None
    n = doc.get("num_hidden_layers", doc.get("n_layer"))
    return n if isinstance(n, int) else None


def _scale(config: dict[str, Any], options: ReadOptions, weights: Path, findings: list[Finding]) -> float:
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise FormatError("lora_parameters is not a JSON object", path=weights)
    if config.get("fine_tune_type") == "full":
        raise FormatError("mlx full fine-tune weights are not an adapter", path=weights)
    if "alpha" in params:
        findings.append(
            warning("dead-alpha", f"lora_parameters.alpha ({params['alpha']}) is ignored by mlx-lm; scale is used")
        )
    if "scale" in params:
        scale = finite_number(params["scale"], "lora_parameters.scale", weights)
        filled(options.scale, scale, "--scale", weights)
        return scale
    if options.scale is None:
        raise UsageError(
            f"{weights.name} stores no scale (old mlx-examples files keep it in the training script)",
            hint="pass --scale S (mlx-examples' default was 20.0; mlx-lm's was 10.0 until mid-2025)",
        )
    return float(options.scale)


def _canonical_shape(key: str, shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    if key.endswith(".m"):
        return shape
    if len(shape) != 2:
        raise FormatError(f"tensor {key!r} is {list(shape)}: MoE SwitchLinear adapters are not supported", path=path)
    return shape[::-1]


def _root(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _config(path: Path) -> dict[str, Any] | None:
    """The mlx adapter_config.json beside `path`, if it is one."""
    file = _root(path) / CONFIG_NAME
    if not file.is_file() or (path.is_file() and path.suffix == ".npz"):
        return None
    try:
        doc = load_json(file)
    except FormatError:
        return None
    return doc if isinstance(doc, dict) and any(k in doc for k in _CONFIG_MARKERS) else None


def _weights(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    raise FormatError(f"no {WEIGHTS_NAME} beside {CONFIG_NAME}", path=path)


def _entries(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key → (dtype code, stored shape), from the safetensors header or the npz member headers."""
    if is_safetensors(path):
        return {k: (t.dtype, t.shape) for k, t in read_header(path).tensors.items()}
    if path.suffix != ".npz":
        raise FormatError("neither safetensors nor .npz", path=path)
    return {k: (_npy_code(dtype, k, path), shape) for k, (dtype, shape) in _npz_headers(path).items()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".npz":
        import numpy as np
        import torch

        _npz_headers(path)  # checks every member's size before numpy allocates it
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise FormatError(f"cannot read npz ({str(e)[:80]})", path=path) from None
    from ..io.checkpoint import Checkpoint

    with Checkpoint(path) as ckpt:
        return {k: ckpt.get(k) for k in ckpt.names}


def _npz_headers(path: Path) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Each `.npy` member's (numpy dtype, shape) from its header alone, without torch.

    A member must hold the bytes its header declares, so that no shape makes numpy allocate more than the file.
    """
    count = zip_entries(path) or 0  # from the file's tail, before zipfile parses every entry
    if count > _MAX_NPZ_MEMBERS:
        raise FormatError(
            f"npz holds {count} members, over the cap of {_MAX_NPZ_MEMBERS}",
            path=path,
            hint="an mlx-examples adapter holds two arrays per adapted module",
        )
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            unpacked, size = sum(m.file_size for m in members), path.stat().st_size
            if unpacked > _MAX_EXPANSION * max(size, 1 << 20):
                raise FormatError(
                    f"npz members unpack to {unpacked} bytes from {size}",
                    path=path,
                    hint="LoRA factors barely compress: this archive is a zip bomb or not an adapter",
                )
            return {tensor_name(m.filename, path).removesuffix(".npy"): _npy_header(z, m, path) for m in members}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FormatError(f"cannot read npz ({str(e)[:80]})", path=path) from None


def _npy_header(z: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path) -> tuple[Any, tuple[int, ...]]:
    import numpy as np

    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    declared = math.prod(shape) * dtype.itemsize
    if declared > member.file_size:
        raise FormatError(
            f"npz member {member.filename!r} declares {shape} ({declared} bytes) but holds {member.file_size}",
            path=path,
        )
    return dtype, tuple(shape)


def _npy_code(dtype: Any, key: str, path: Path) -> str:
    """The safetensors code of a numpy dtype (float, int, uint, bool)."""
    code = "BOOL" if dtype.kind == "b" else f"{dtype.kind.upper()}{dtype.itemsize * 8}"
    if code not in DTYPE_SIZES or dtype.kind not in "fiub" or dtype.byteorder == ">":
        raise FormatError(f"npz member {key!r} has dtype {dtype}, not a tensor dtype", path=path)
    return code


def _metadata(path: Path) -> dict[str, str]:
    return read_header(path).metadata if is_safetensors(path) else {}
