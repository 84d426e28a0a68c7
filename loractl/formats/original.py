"""A diffusion transformer's LoRA in its original repository's module names: ComfyUI's native layout.

    diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight   (A)   or  ….lora_A.weight
    diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight     (B)   or  ….lora_B.weight
    diffusion_model.double_blocks.0.img_attn.qkv.alpha              (scale = alpha/rank; none: 1)
    text_encoders.clip_l.transformer.text_model.…                   (CLIP-L; `t5xxl` for T5)

ComfyUI reads both leaf styles; ai-toolkit and musubi-tuner write it for ComfyUI; diffusers 0.42 reads the
`lora_down` style for Flux.1 (its kohya path), so that is what is written, with one `.alpha` per module (except
where diffusers' reader refuses one — Wan's modules outside its blocks —: there the scale is folded into B);
LTX-Video's, which diffusers reads only with `lora_A`/`lora_B` and no alpha, are written so.
XLabs' Flux files (`double_blocks.0.processor.qkv_lora1.down.weight`, no alpha: scale 1) are read as the same
modules (`qkv_lora1` = `img_attn.qkv`, `qkv_lora2` = `txt_attn.qkv`, `proj_lora1/2` = `img_attn/txt_attn.proj`).
ai-toolkit's Flux.2 LoKr files (`diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1`, `lokr_w2_a`, …, `.alpha`)
read as the exact LoRA each Kronecker product equals (`kohya.lycoris`).
BFL's control LoRAs (FLUX.1 Canny/Depth [dev] LoRA: fal's names without `base_model.model.`, `lora_B.bias`, and
the qk norms' new `…norm.query_norm.scale` / `key_norm.scale`, kept as full tensors that replace the base's;
`img_in` takes twice the channels, diffusers widens `x_embedder` to load it) read as the same modules, and an
adapter with those norm scales is written so (`_write_control`; with lora biases but no norms: fal's layout).
fal's Flux Kontext files (`base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight`, optional `lora_B.bias`,
no alpha) read as the same modules too. Module paths are `transformer.` + the original names (`_dit` splits them
into diffusers' names).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import lineage
from ..errors import AdapterError, FormatError
from ..findings import Finding
from ..info import AdapterInfo, FullTensorInfo, ScaleRule
from ..io.safetensors_header import is_safetensors, read_header
from ..io.values import scalar_alpha
from ._dit import COMPONENT, Layout, recognise, relayout
from ._modules import exact_scales, module_info
from .kohya import lycoris
from .options import Feature, ReadOptions, WriteOptions

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter, LoraModule

NAME = "original"
HOLDS: frozenset[Feature] = frozenset({"module_scale", "module_rank", "bias"})  # bias: in BFL's control layout
LAYOUT: Layout = "original"
PREFIXES = {
    "diffusion_model.": COMPONENT,
    "text_encoders.clip_l.transformer.": "text_encoder.",
    "text_encoders.t5xxl.transformer.": "text_encoder_2.",
}
_LEAVES = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B", "alpha": "alpha"}
_LEAVES |= {role: role for role in lycoris.LOKR}  # ai-toolkit's Flux.2 LoKr: read as the exact LoRA it equals
_KEY = re.compile(rf"^({'|'.join(map(re.escape, PREFIXES))})(.+)\.({'|'.join(map(re.escape, _LEAVES))})$")
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])\.(down|up)\.weight$"
)
# fal's Flux Kontext trainer: PEFT's `base_model.model.` over BFL's names, lora_A/lora_B (+ lora_B.bias), no alpha
# BFL's own control LoRAs (FLUX.1 Canny / Depth [dev] LoRA) are these keys bare, with the qk norms' new scales
_FAL = re.compile(
    r"^(?:base_model\.model\.)?((?:double_blocks|single_blocks)\.\d+\..+|final_layer\..+|img_in|txt_in"
    r"|(?:time_in|vector_in|guidance_in)\..+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)$"
)
_BFL_NORM = re.compile(
    r"^((?:double_blocks\.\d+\.(?:img|txt)_attn|single_blocks\.\d+)\.norm\.(?:query|key)_norm\.scale)$"
)
_FAL_ROLES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias"}
_XLABS_PARTS = {("qkv", "1"): "img_attn.qkv", ("qkv", "2"): "txt_attn.qkv",
                ("proj", "1"): "img_attn.proj", ("proj", "2"): "txt_attn.proj"}  # fmt: skip


def detect(path: Path) -> bool:
    """A safetensors file whose every key is an original-layout (or XLabs) LoRA key."""
    if not path.is_file() or not is_safetensors(path):
        return False
    try:
        keys = list(read_header(path).tensors)
    except FormatError:
        return False
    return (
        bool(keys) and all(_split(k) or _BFL_NORM.match(k) for k in keys) and not all(_BFL_NORM.match(k) for k in keys)
    )


def describe(path: Path, options: ReadOptions) -> AdapterInfo:
    """Group keys into modules; scale = alpha/rank where a module has an alpha, else 1."""
    from ..io.checkpoint import Checkpoint

    header = read_header(path)
    groups: dict[str, dict[str, str]] = {}
    full = {
        COMPONENT + key: FullTensorInfo(key, t.dtype, t.shape)
        for key, t in header.tensors.items()
        if _BFL_NORM.match(key)
    }
    for key in header.tensors:
        if COMPONENT + key in full:
            continue
        split = _split(key)
        if split is None:
            raise FormatError(
                f"tensor {key!r} is not an original-layout LoRA key",
                path=path,
                hint="loractl reads diffusion_model.<module>.lora_A/lora_B/lora_down/lora_up/alpha and XLabs' "
                "double-block processors",
            )
        groups.setdefault(split[0], {})[split[1]] = key
    findings: list[Finding] = []
    modules = {}
    with Checkpoint(path) as ckpt:
        for module, keys in sorted(groups.items()):
            alpha = scalar_alpha(ckpt, keys["alpha"], path) if "alpha" in keys else None
            roles = {r: k for r, k in keys.items() if r != "alpha"}
            if lycoris.is_lycoris(roles):
                info = lycoris.module_info(module, roles, header.tensors, alpha, None, findings)
                if info is not None:
                    modules[module] = info
                continue
            entries = {k: (header.tensors[k].dtype, header.tensors[k].shape) for k in roles.values()}
            info = module_info(module, roles, entries, _scale_of(alpha), findings)
            if info is not None:
                modules[module] = info
    record = lineage.decode(header.metadata)
    return AdapterInfo(
        path=path,
        format=NAME,
        files=(path,),
        modules=exact_scales(modules, record),
        full_tensors=full,
        base_model=record.base_model if record else None,
        record=record,
        findings=tuple(findings),
    )


def read(path: Path, options: ReadOptions) -> Adapter:
    """Load the adapter (tensors as stored; the scale carries alpha); a LoKr module as the exact LoRA it equals."""
    from dataclasses import replace

    from ..io.checkpoint import Checkpoint
    from ._reading import adapter_from_info

    info = describe(path, options)
    with Checkpoint(path) as ckpt:
        plain = replace(info, modules={n: m for n, m in info.modules.items() if m.structure is None})
        adapter = adapter_from_info(plain, ckpt.get)
        exact = {n: lycoris.exact_lora(m, ckpt.get) for n, m in info.modules.items() if m.structure is not None}
    if not exact:
        return adapter
    return replace(adapter, modules=dict(sorted((adapter.modules | exact).items())))


def keeps_full(key: str) -> bool:
    """The full tensors this layout holds: BFL control LoRAs' qk-norm scales."""
    return key.startswith(COMPONENT) and _BFL_NORM.match(key[len(COMPONENT) :]) is not None


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """`lora_down` / `lora_up` / `alpha` (float32, = scale·rank) under `diffusion_model.` (diffusers' modules fused);
    an adapter with qk-norm scales or lora biases in BFL's control layout or fal's (what diffusers' readers of them take)."""
    from dataclasses import replace

    import torch

    from ..io.atomic import atomic_output
    from ..io.safetensors_writer import save_tensors
    from ._record import record_for

    adapter = relayout(adapter, LAYOUT)
    if adapter.full_tensors or any(m.bias is not None for m in adapter.modules.values()):
        return _write_control(adapter, path, force=force)
    found = recognise({n: m.in_features for n, m in adapter.modules.items()})
    no_alpha = found.arch.no_alpha if found else None
    tensors: dict[str, torch.Tensor] = {}
    inexact: dict[str, float] = {}
    folded: dict[str, LoraModule] = {}  # as written (the record's hash is of what a reader gets back)
    for module, m in adapter.modules.items():
        if m.kind != "linear" or m.magnitude is not None or m.fan_in_fan_out:
            raise AdapterError(
                f"module {module!r}: the original layout holds plain linear LoRA only",
                hint="use 'loractl convert', which lists and drops what the target cannot hold",
            )
        key = _key(module)
        a_leaf, b_leaf = found.arch.original_leaves if found else ("lora_down.weight", "lora_up.weight")
        if no_alpha is not None and module.startswith(COMPONENT) and no_alpha.match(module[len(COMPONENT) :]):
            b = m.B if m.scale == 1 else (m.B.double() * m.scale).to(m.B.dtype)  # scale 1 without an alpha
            tensors |= {f"{key}.{a_leaf}": m.A, f"{key}.{b_leaf}": b}
            folded[module] = replace(m, B=b, scale=1.0, alpha=float(m.rank), scale_rule="alpha/r")
            continue
        alpha = torch.tensor(m.scale * m.rank, dtype=torch.float32)
        tensors |= {f"{key}.{a_leaf}": m.A, f"{key}.{b_leaf}": m.B, f"{key}.alpha": alpha}
        if float(alpha) / m.rank != m.scale:
            inexact[module] = m.scale
    written = replace(adapter, modules=adapter.modules | folded) if folded else adapter
    metadata = {"format": "pt", lineage.METADATA_KEY: lineage.encode(record_for(written, inexact))}
    with atomic_output(path, force=force) as tmp:
        save_tensors(tmp, tensors, metadata)
    return path


def _write_control(adapter: Adapter, path: Path, *, force: bool) -> Path:
    """BFL's control layout: bare BFL names, `lora_A`/`lora_B` (+ `lora_B.bias`), no alpha (each scale folded into
    B and its bias, as PEFT scales both), the qk-norm scales as they are; without norm scales, fal's (Kontext) layout,
    the same under `base_model.model.`: diffusers tells the two apart by the norms, and reads each."""
    from dataclasses import replace

    from ..io.atomic import atomic_output
    from ..io.safetensors_writer import save_tensors
    from ._record import record_for

    tensors: dict[str, torch.Tensor] = {}
    written: dict[str, LoraModule] = {}
    for module, m in adapter.modules.items():
        if not module.startswith(COMPONENT) or m.kind != "linear" or m.magnitude is not None or m.fan_in_fan_out:
            raise AdapterError(
                f"module {module!r}: BFL's control layout holds plain linear transformer LoRA only",
                hint="use 'loractl convert', which lists and drops what the target cannot hold",
            )
        scaled = m if m.scale == 1 else replace(m, B=_scaled(m.B, m.scale), bias=m.bias if m.bias is None else _scaled(m.bias, m.scale), scale=1.0, alpha=float(m.rank))  # fmt: skip
        key = ("" if adapter.full_tensors else "base_model.model.") + module[len(COMPONENT) :]
        tensors |= {f"{key}.lora_A.weight": scaled.A, f"{key}.lora_B.weight": scaled.B}
        if scaled.bias is not None:
            tensors[f"{key}.lora_B.bias"] = scaled.bias
        written[module] = scaled
    unheld = sorted(k for k in adapter.full_tensors if not keeps_full(k))
    if unheld:
        raise AdapterError(
            f"the original layout cannot hold the full tensor {unheld[0]!r} ({len(unheld)} in all)",
            hint="use 'loractl convert', which measures and drops them",
        )
    tensors |= {k[len(COMPONENT) :]: t for k, t in adapter.full_tensors.items()}
    record = record_for(replace(adapter, modules=written), {})
    with atomic_output(path, force=force) as tmp:
        save_tensors(tmp, tensors, {"format": "pt", lineage.METADATA_KEY: lineage.encode(record)})
    return path


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return (t.double() * scale).to(t.dtype)


def _split(key: str) -> tuple[str, str] | None:
    """(module path, role) of an original-layout or XLabs key, or None."""
    match = _KEY.match(key)
    if match is not None:
        prefix, module, leaf = match.groups()
        return PREFIXES[prefix] + module, _LEAVES[leaf]
    fal = _FAL.match(key)
    if fal is not None:
        return COMPONENT + fal.group(1), _FAL_ROLES[fal.group(2)]
    xlabs = _XLABS.match(key)
    if xlabs is not None:
        block, what, stream, side = xlabs.groups()
        return f"{COMPONENT}double_blocks.{block}.{_XLABS_PARTS[what, stream]}", "A" if side == "down" else "B"
    return None


def _key(module: str) -> str:
    for prefix, component in PREFIXES.items():
        if module.startswith(component):
            return prefix + module[len(component) :]
    raise AdapterError(
        f"module {module!r} is not a diffusion transformer's or its text encoders'",
        hint="the original layout is for diffusion transformers (Flux); convert to peft for other models",
    )


def _scale_of(alpha: float | None) -> Callable[[int], tuple[float, float | None, ScaleRule]]:
    def scale_of(rank: int) -> tuple[float, float | None, ScaleRule]:
        return (alpha / rank, alpha, "alpha/r") if alpha else (1.0, float(rank), "alpha/r")

    return scale_of
