"""kohya-ss sd-scripts / ComfyUI / A1111 / LyCORIS LoCon: `lora_unet_…` safetensors (FORMATS.md §2, §8).

One file, per module `<name>.lora_down.weight` (A), `<name>.lora_up.weight` (B) and a scalar
`<name>.alpha` (scale = alpha/rank; no alpha means scale 1). Names are `prefix + path` with
every '.' replaced by '_' (see `kohya_names`). LoCon reads as LoRA; LyCORIS LoHa and LoKr read as
the exact LoRA they equal (`lycoris`); the other LyCORIS algorithms are refused with the way to get
a LoRA. DoRA is LyCORIS'
`dora_scale`, (out, 1, …) with the norm per output row (`wd_on_out`, its default): PEFT's
magnitude, so PEFT DoRA ↔ kohya is exact.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ... import lineage
from ...errors import AdapterError, FormatError
from ...findings import Finding, error, warning
from ...info import AdapterInfo, ModuleInfo, ScaleRule
from ...io.safetensors_header import TensorInfo, is_safetensors, read_header
from ...io.values import scalar_alpha
from .._dit import COMPONENT as TRANSFORMER
from .._dit import Layout, recognise, relayout
from .._modules import exact_scales, module_info, recorded_layout
from ..options import Feature, ReadOptions, WriteOptions
from . import lycoris
from . import names as kohya_names

if TYPE_CHECKING:
    import torch

    from ...adapter import Adapter, LoraModule

NAME = "kohya"
# fan_in_fan_out: the factors are the same; loractl's record keeps the flag (`_record`)
HOLDS: frozenset[Feature] = frozenset({"module_scale", "module_rank", "conv", "dora", "fan_in_fan_out"})
# why no full tensor converts to kohya (convert's hint): ComfyUI's key map gives `lora_unet_…` names only to
# parameters ending `.weight`, sd-scripts writes none but LoRA factors; a Flux control LoRA's `.scale` has none
NO_FULL_TENSORS = (
    "kohya's names (lora_unet_…) stand only for a module's weight: neither sd-scripts nor ComfyUI reads a full "
    "tensor (a Flux control LoRA's qk-norm scale) under them"
)
NAMES_KEY = "loractl_module_paths"  # JSON {kohya name: module path}, so loractl's own files need no --base
LEAVES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", "dora_scale": "magnitude"}
LYCORIS = {"oft_": "OFT", "a1.": "GLoRA", "lora_mid.": "LoCon with Tucker cores"}  # refused (LoHa, LoKr: `lycoris`)
FULL_DELTAS = ("diff", "diff_b", "w_norm", "b_norm", "bias", "scale", "on_input", "weight")
LAYOUT: Layout = "original"  # diffusion transformers (Flux): the original repository's fused modules, as sd-scripts
_LYCORIS_DIT = re.compile(r"^(single_)?transformer_blocks\.\d+\.")  # no language model's path starts so
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def detect(path: Path) -> bool:
    """A safetensors file whose keys start with kohya's or LyCORIS' prefixes."""
    if not path.is_file() or not is_safetensors(path):
        return False
    try:
        keys = read_header(path).tensors
    except FormatError:
        return False
    return any(kohya_names.PREFIX_RE.match(k) for k in keys)


def describe(path: Path, options: ReadOptions) -> AdapterInfo:
    """Group keys into modules, resolve names, and read the alpha scalars (a few bytes each)."""
    from ...io.checkpoint import Checkpoint

    header = read_header(path)
    groups = _group_keys(path, list(header.tensors))
    recorded = _recorded_names(header.metadata)
    paths = _transformer_paths(kohya_names.resolve(groups, base=options.base, recorded=recorded))
    record = lineage.decode(header.metadata)
    findings: list[Finding] = []
    modules = {}
    flattened = [paths[n] for n, keys in groups.items() if lycoris.is_lycoris(keys)]
    base_shapes = _base_shapes(options.base, flattened) if options.base is not None and flattened else {}
    with Checkpoint(path) as ckpt:
        for name, keys in groups.items():
            alpha = scalar_alpha(ckpt, keys["alpha"], path) if "alpha" in keys else None
            info = _module_info(paths[name], keys, header.tensors, alpha, base_shapes.get(paths[name]), findings)
            if info is not None:
                modules[paths[name]] = info
    return AdapterInfo(
        path=path,
        format=NAME,
        files=(path,),
        modules=recorded_layout(exact_scales(dict(sorted(modules.items())), record), record),
        full_tensors={},
        base_model=record.base_model if record else None,
        base_revision=record.base_revision if record else None,
        record=record,
        findings=tuple(findings),
    )


def read(path: Path, options: ReadOptions) -> Adapter:
    """Load the adapter; `dora_scale` (out, 1) becomes the (out,) magnitude, LoHa/LoKr their exact LoRA."""
    from dataclasses import replace

    from ...io.checkpoint import Checkpoint
    from .._reading import adapter_from_info

    info = describe(path, options)
    metadata = read_header(path).metadata
    with Checkpoint(path) as ckpt:

        def get(key: str) -> torch.Tensor:
            t = ckpt.get(key)
            return t.reshape(-1) if key.endswith(".dora_scale") else t

        plain = replace(info, modules={n: m for n, m in info.modules.items() if m.structure is None})
        adapter = adapter_from_info(plain, get)
        exact = {n: lycoris.exact_lora(m, get) for n, m in info.modules.items() if m.structure is not None}
    if exact:
        adapter = replace(adapter, modules=dict(sorted((adapter.modules | exact).items())))
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in _STALE_METADATA}
    return replace(adapter, meta=replace(adapter.meta, extra={"kohya_metadata": kept}))


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write one kohya safetensors file: per-module alpha = scale·rank (float32), `ss_*` metadata.

    A DoRA magnitude (out,) is written as LyCORIS' `dora_scale` (out, 1, …), one 1 per weight dim after the first.
    """
    from ...io.atomic import atomic_output
    from ...io.safetensors_writer import save_tensors

    adapter = relayout(adapter, LAYOUT)
    _refuse_unheld(adapter)
    names = _kohya_names(list(adapter.modules))
    tensors: dict[str, torch.Tensor] = {}
    inexact: dict[str, float] = {}
    for module, m in adapter.modules.items():
        name = names[module]
        alpha = _alpha_tensor(m)
        tensors |= {f"{name}.lora_down.weight": m.A, f"{name}.lora_up.weight": m.B, f"{name}.alpha": alpha}
        if m.magnitude is not None:
            tensors[f"{name}.dora_scale"] = m.magnitude.reshape(m.out_features, *[1] * (m.A.ndim - 1))
        if float(alpha.item()) / m.rank != m.scale:
            inexact[module] = m.scale
    metadata = _metadata(adapter, inexact)
    metadata[NAMES_KEY] = json.dumps({v: k for k, v in sorted(names.items())}, sort_keys=True)
    with atomic_output(path, force=force) as tmp:
        save_tensors(tmp, tensors, metadata)
    return path


def _recorded_names(metadata: dict[str, str]) -> dict[str, str]:
    """loractl's {kohya name: module path} record; a mangled one counts as absent (names are then resolved)."""
    try:
        doc = json.loads(metadata.get(NAMES_KEY, "{}"))
    except (ValueError, RecursionError):
        return {}
    ok = isinstance(doc, dict) and all(isinstance(v, str) for v in doc.values())
    return doc if ok else {}


def _group_keys(path: Path, keys: list[str]) -> dict[str, dict[str, str]]:
    """kohya module name → {role: key}; refuses LyCORIS algorithms and malformed names."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        if not kohya_names.PREFIX_RE.match(key):
            raise FormatError(f"tensor {key!r} has no kohya prefix in a kohya file", path=path)
        name, _, leaf = key.partition(".")
        _check_leaf(path, key, name, leaf)
        groups.setdefault(name, {})[LEAVES.get(leaf, leaf)] = key
    return groups


def _check_leaf(path: Path, key: str, name: str, leaf: str) -> None:
    for marker, algo in LYCORIS.items():
        if leaf.startswith(marker):
            raise FormatError(
                f"{algo} module {name!r} ({key!r}) is not a LoRA",
                path=path,
                hint="merge it into its base with the tool that made it (LyCORIS, ComfyUI, sd-scripts), then "
                "'loractl extract BASE MERGED --rank R' gives a LoRA",
            )
    if leaf in LEAVES or leaf in lycoris.ROLES:
        return
    for suffix in ("_lora_down", "_lora_up"):
        if name.endswith(suffix) and leaf == "weight":
            raise FormatError(
                f"tensor {key!r} has the malformed suffix '{suffix}.weight' (kohya writes '{suffix.replace('_', '.', 1)}"
                ".weight'): the file was renamed by a broken converter",
                path=path,
                hint="convert from the original file instead (its keys were probably diffusers "
                "'….lora.down.weight'); this file also lacks every '.alpha'",
            )
    kind = "a full delta or norm tensor" if leaf in FULL_DELTAS else "not a LoRA tensor loractl knows"
    raise FormatError(
        f"tensor {key!r}: '.{leaf}' is {kind}", path=path, hint="loractl reads LoRA, LoCon, LoHa and LoKr modules"
    )


def _module_info(
    module: str,
    keys: dict[str, str],
    entries: dict[str, TensorInfo],
    alpha: float | None,
    base_shape: tuple[int, ...] | None,
    findings: list[Finding],
) -> ModuleInfo | None:
    """One module: scale = alpha/rank, 1 without alpha; an (out, 1) dora_scale is the magnitude."""
    roles = {r: k for r, k in keys.items() if r != "alpha"}
    shaped = {k: (entries[k].dtype, entries[k].shape) for k in roles.values()}
    if "magnitude" in roles:
        shape = entries[roles["magnitude"]].shape
        if len(shape) < 2 or shape[1:] != (1,) * (len(shape) - 1):
            findings.append(
                error("dora-axis", f"dora_scale {list(shape)} is per input column: not PEFT's DoRA", module)
            )
            return None
        shaped[roles["magnitude"]] = (entries[roles["magnitude"]].dtype, (shape[0],))
    if alpha == 0:
        findings.append(warning("zero-alpha", "alpha is 0: kohya reads it as alpha = rank (scale 1)", module))
    if lycoris.is_lycoris(roles):
        return _lycoris_info(module, roles, entries, alpha, base_shape, findings)

    def scale_of(rank: int) -> tuple[float, float | None, ScaleRule]:
        return (alpha / rank, alpha, "alpha/r") if alpha else (1.0, float(rank), "alpha/r")

    return module_info(module, roles, shaped, scale_of, findings)


def _lycoris_info(
    module: str,
    roles: dict[str, str],
    entries: dict[str, TensorInfo],
    alpha: float | None,
    base_shape: tuple[int, ...] | None,
    findings: list[Finding],
) -> ModuleInfo | None:
    """A LoHa/LoKr module, its dora_scale (if any) one value per output row as for LoRA."""
    from dataclasses import replace

    info = lycoris.module_info(module, {r: k for r, k in roles.items() if r != "magnitude"}, entries, alpha,
                               base_shape, findings)  # fmt: skip
    if info is None or "magnitude" not in roles:
        return info
    key = roles["magnitude"]
    if entries[key].shape[0] != info.out_features:
        findings.append(error("magnitude-shape", f"dora_scale is {list(entries[key].shape)}", module))
        return None
    return replace(
        info,
        keys=info.keys | {"magnitude": key},
        shapes=info.shapes | {"magnitude": (info.out_features,)},
        dtypes=info.dtypes | {"magnitude": entries[key].dtype},
    )


def _base_shapes(base: Path, modules: list[str]) -> dict[str, tuple[int, ...]]:
    """The base's weight shape of each module (LoHa/LoKr conv kernels are stored flattened)."""
    from ...io.checkpoint import Checkpoint

    out = {}
    with Checkpoint(base) as ckpt:
        for module in modules:
            component = next((c for c in kohya_names.PREFIXES.values() if c and module.startswith(c)), "")
            for name in (f"{module}.weight", f"{module[len(component) :]}.weight"):
                if name in ckpt:
                    out[module] = tuple(ckpt.info(name).shape)
                    break
    return out


def _refuse_unheld(adapter: Adapter) -> None:
    for module, m in adapter.modules.items():
        if m.kind == "embedding" or m.bias is not None:
            raise AdapterError(
                f"module {module!r}: kohya files cannot hold embedding LoRA or lora bias",
                hint="use 'loractl convert', which lists and drops what the target cannot hold",
            )
    if adapter.full_tensors:
        raise AdapterError("kohya files cannot hold full tensors", hint="use 'loractl convert'")


def _transformer_paths(paths: dict[str, str]) -> dict[str, str]:
    """sd-scripts and musubi-tuner name a diffusion transformer's modules `lora_unet_`: read as `transformer.` + the
    original module names; text encoders by the architecture's prefixes (Flux's `lora_te3_` T5 is `text_encoder_2.`).
    LyCORIS wrapping diffusers' transformer names its blocks `lycoris_transformer_blocks_0_attn_to_q` (Flux.2 LoKr,
    diffusers' `_convert_lycoris_flux2_lokr_to_diffusers`): `transformer.` + diffusers' names."""
    dit = {n: TRANSFORMER + p[len("unet.") :] for n, p in paths.items() if p.startswith("unet.")}
    dit |= {n: TRANSFORMER + p for n, p in paths.items() if n.startswith("lycoris_") and _LYCORIS_DIT.match(p)}
    found = recognise(dict.fromkeys(dit.values(), 0)) if dit else None
    if found is None:
        return paths
    dit = {n: TRANSFORMER + found.arch.from_kohya(p[len(TRANSFORMER) :]) for n, p in dit.items()}
    by_prefix = {prefix: component for component, prefix in found.arch.kohya_text_encoders.items()}
    encoders = {}
    for name in paths:
        prefix = kohya_names.split_prefix(name)[0]
        if prefix in by_prefix:
            encoders[name] = by_prefix[prefix] + "." + paths[name].split(".", 1)[1]
    return paths | dit | encoders


def _kohya_names(modules: list[str]) -> dict[str, str]:
    """Module path → kohya name; SDXL-style lora_te1_/lora_te2_ when a second text encoder is adapted.

    A diffusion transformer is sd-scripts' and musubi-tuner's: `lora_unet_` + its original names, text encoders by
    the architecture's prefixes (Flux.1: `lora_te1_` CLIP-L, `lora_te3_` T5; SD3: `lora_te1_`, `lora_te2_`, `lora_te3_`).
    """
    found = recognise(dict.fromkeys(modules, 0))
    if found is not None:
        return _checked({m: _transformer_name(m, found.arch.kohya_text_encoders) for m in modules})
    names = {m: kohya_names.flatten(m)[0] for m in modules}
    if any(n.startswith("lora_te2_") for n in names.values()):
        names = {m: "lora_te1_" + n[len("lora_te_") :] if n.startswith("lora_te_") else n for m, n in names.items()}
    return _checked(names)


def _transformer_name(module: str, prefixes: dict[str, str]) -> str:
    if module.startswith(TRANSFORMER):
        return "lora_unet_" + module[len(TRANSFORMER) :].replace(".", "_")
    component, _, rest = module.partition(".")
    if component in prefixes:
        return prefixes[component] + rest.replace(".", "_")
    return kohya_names.flatten(module)[0]


def _checked(names: dict[str, str]) -> dict[str, str]:
    clashes = [n for n, c in Counter(names.values()).items() if c > 1]
    if clashes:
        raise AdapterError(
            f"two modules flatten to the same kohya name {clashes[0]!r}", hint="kohya cannot tell them apart"
        )
    return names


def _alpha_tensor(m: LoraModule) -> torch.Tensor:
    """alpha = scale·rank as a float32 scalar (the written alpha when it gives the same scale)."""
    import torch

    alpha = m.alpha if m.scale_rule == "alpha/r" and m.alpha and m.alpha / m.rank == m.scale else m.scale * m.rank
    return torch.tensor(alpha, dtype=torch.float32)


def _metadata(adapter: Adapter, inexact: dict[str, float]) -> dict[str, str]:
    """kohya's `ss_*` keys (the source's when it was kohya, stale hashes dropped) and loractl's record."""
    from .._record import record_for

    mods = adapter.modules.values()
    ranks = {m.rank for m in mods}
    alphas = {float(_alpha_tensor(m).item()) for m in mods}
    out = dict(adapter.meta.extra.get("kohya_metadata") or {})
    out |= {
        "ss_network_module": out.get("ss_network_module", "networks.lora"),
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        lineage.METADATA_KEY: lineage.encode(record_for(adapter, inexact)),
    }
    if "ss_network_args" not in out:
        out |= _network_args(adapter)
    out |= _base_version(adapter)
    return out


def _network_args(adapter: Adapter) -> dict[str, str]:
    """conv_dim/conv_alpha for 3×3 conv LoRA; DoRA is LyCORIS' (`lycoris.kohya`, `dora_wd`), as its loaders expect."""
    mods = adapter.modules.values()
    args: dict[str, str] = {}
    conv = [m for m in mods if m.kind == "conv" and m.A.shape[2:] != (1, 1)]
    if conv:
        args |= {"conv_dim": str(conv[0].rank), "conv_alpha": str(conv[0].scale * conv[0].rank)}
    if any(m.magnitude is not None for m in mods):
        args |= {"algo": "locon", "dora_wd": "True", "wd_on_output": "True"}
        return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
    return {"ss_network_args": json.dumps(args)} if args else {}


def _base_version(adapter: Adapter) -> dict[str, str]:
    """`ss_base_model_version` / `ss_v2` for SD UNets, from the cross-attention width (768 SD1, 1024 SD2, 2048 SDXL)."""
    if "ss_base_model_version" in adapter.meta.extra.get("kohya_metadata", {}):
        return {}
    widths = {m.in_features for p, m in adapter.modules.items() if p.startswith("unet.") and p.endswith("attn2.to_k")}
    version = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(widths.pop()) if len(widths) == 1 else None
    return {"ss_base_model_version": version, "ss_v2": str(version == "sd_v2")} if version else {}
