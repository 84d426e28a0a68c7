"""diffusers LoRA files: `pytorch_lora_weights.safetensors` (FORMATS.md §3).

Module paths keep the pipeline component (`unet.`, `text_encoder.`, `transformer.`, ...).
Four key generations are read:
    (a)  `down_blocks.0….attn1.processor.to_q_lora.down.weight`  (attn-procs; no `unet.` prefix)
    (b)  `text_encoder.….q_proj.lora_linear_layer.down.weight`
    (c)  `unet.….attn1.to_k.lora.down.weight`                    (SD training scripts)
    (d)  `transformer.….to_q.lora_A.weight`                        (PEFT keys; current)
(a)–(c) carry no alpha (scale 1) unless `<module>.alpha` tensors are present; (d) has its
scales in the `lora_adapter_metadata` LoraConfig dicts, else alpha = rank. Written: (d), with
`lora_adapter_metadata`, so per-module ranks, alphas and rsLoRA hold exactly; a Flux control LoRA's
qk-norm scales (the one full tensor `load_lora_weights` loads) under diffusers' names (`keeps_full`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import lineage
from ..errors import AdapterError, FormatError
from ..findings import Finding, error
from ..info import AdapterInfo, FullTensorInfo, scale_from_alpha
from ..io.safetensors_header import is_safetensors, read_header
from ..io.values import parse_json, scalar_alpha
from ._dit import Layout, relayout
from ._modules import exact_scales, module_info, no_weights_in
from .options import Feature, ReadOptions, WriteOptions
from .peft.config import module_alpha_rank

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter

NAME = "diffusers"
HOLDS: frozenset[Feature] = frozenset({"module_scale", "module_rank", "rslora", "dora", "bias", "conv"})
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
LAYOUT: Layout = "diffusers"  # diffusion transformers (Flux): diffusers' split q/k/v, written from either layout
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
_COMPONENT = re.compile(rf"^({'|'.join(COMPONENTS)})\.")
# What LoRA adapts in diffusers' transformer models (SD3, Flux, HunyuanVideo, Wan, Lumina, HiDream, ...):
# transformers' language models call their trunk `transformer` too (GPT-2's `transformer.h.N`), and are no pipeline.
_DIFFUSION_TRANSFORMER = re.compile(
    r"^transformer\.(transformer_blocks|single_transformer_blocks|joint_transformer_blocks|double_stream_blocks"
    r"|single_stream_blocks|blocks|layers|noise_refiner|context_refiner|x_embedder|context_embedder|time_text_embed"
    r"|time_embed|proj_out|norm_out|pos_embed|patch_embed|caption_projection|condition_embedder|adaln_single|img_in|txt_in|proj_in"
    r"|time_guidance_embed|double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation"
    r"|all_x_embedder|all_final_layer|cap_embedder|t_embedder)(\.|$)"
)
# attn-procs names: (a) for the UNet, and the text encoder's CLIP names they stood for.
_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROC_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_RULES = (
    (re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"), "proc"),
    (re.compile(r"^(.*)\.lora_linear_layer\.(down|up)\.weight$"), "plain"),
    (re.compile(r"^(.*)\.lora\.(down|up)\.weight$"), "plain"),
    (re.compile(r"^(.*)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector|alpha)$"), "peft"),
)
# FluxLoraLoaderMixin's `_control_lora_supported_norm_keys` in the blocks of FluxTransformer2DModel
_CONTROL_NORM = re.compile(
    r"^transformer\.(transformer_blocks\.\d+\.attn\.norm_(added_)?[qk]|single_transformer_blocks\.\d+\.attn\.norm_[qk])"
    r"\.weight$"
)
_ROLES = {"down": "A", "up": "B", "lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias"}
_ROLES |= {"lora_magnitude_vector": "magnitude", "alpha": "alpha"}


def detect(path: Path) -> bool:
    """A safetensors file (or a directory holding `pytorch_lora_weights.safetensors`) with diffusers keys."""
    weights = _weights(path)
    if weights is None or not is_safetensors(weights):
        return False
    try:
        keys = list(read_header(weights).tensors)
    except FormatError:
        return False
    return (
        bool(keys)
        and all(_split(k) or keeps_full(k) for k in keys)
        and any(_COMPONENT.match(k) or "_lora." in k for k in keys)
        and not all(keeps_full(k) for k in keys)
    )


def keeps_full(key: str) -> bool:
    """The full tensors a diffusers file holds: a Flux control LoRA's qk-norm scales, which `load_lora_weights`
    loads into the transformer (`_control_lora_supported_norm_keys`); no other full tensor has a key it loads."""
    return _CONTROL_NORM.match(key) is not None


def describe(path: Path, options: ReadOptions) -> AdapterInfo:
    """Group keys into modules and resolve scales from `.alpha` tensors or the LoraConfig metadata."""
    weights = _weights(path)
    if weights is None:
        raise no_weights_in(path, WEIGHTS_NAME)
    header = read_header(weights)
    groups: dict[str, dict[str, str]] = {}
    full = {k: FullTensorInfo(k, t.dtype, t.shape) for k, t in header.tensors.items() if keeps_full(k)}
    for key in header.tensors:
        if key in full:
            continue
        split = _split(key)
        if split is None:
            raise FormatError(f"tensor {key!r} is not a diffusers LoRA key", path=weights)
        groups.setdefault(split[0], {})[split[1]] = key
    configs = _configs(header.metadata, weights)
    alphas = _alphas(weights, groups)
    findings: list[Finding] = []
    modules = {}
    for module, keys in sorted(groups.items()):
        roles = {r: k for r, k in keys.items() if r != "alpha"}
        entries = {k: (header.tensors[k].dtype, header.tensors[k].shape) for k in roles.values()}
        info = module_info(module, roles, entries, _scale_rule(module, configs, alphas.get(module), findings), findings)
        if info is not None:
            modules[module] = info
    record = lineage.decode(header.metadata)
    return AdapterInfo(
        path=weights,
        format=NAME,
        files=(weights,),
        modules=exact_scales(modules, record),
        full_tensors=full,
        base_model=record.base_model if record else None,
        record=record,
        config={"lora_adapter_metadata": configs} if configs else {},
        findings=tuple(findings),
    )


def read(path: Path, options: ReadOptions) -> Adapter:
    """Load the adapter (tensors as stored; the scale carries alpha)."""
    from dataclasses import replace

    from ..io.checkpoint import Checkpoint
    from ._reading import adapter_from_info

    info = describe(path, options)
    with Checkpoint(info.files[0]) as ckpt:
        adapter = adapter_from_info(info, ckpt.get)
    # a zero lora bias changes nothing: the writer's filler (`_tensors`), read as no bias
    modules = {
        n: replace(m, bias=None) if m.bias is not None and not m.bias.any() else m for n, m in adapter.modules.items()
    }
    return replace(adapter, modules=modules, meta=replace(adapter.meta, extra={}))


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write generation (d) keys and `lora_adapter_metadata` (one LoraConfig per component)."""
    from ..io.atomic import atomic_output
    from ..io.safetensors_writer import save_tensors
    from ._record import record_for

    adapter = relayout(adapter, LAYOUT)
    _refuse_unheld(adapter)
    metadata_doc, inexact = _metadata_doc(adapter)
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps(metadata_doc, sort_keys=True),
        lineage.METADATA_KEY: lineage.encode(record_for(adapter, inexact)),
    }
    with atomic_output(path, force=force) as tmp:
        save_tensors(tmp, _tensors(adapter), metadata)
    return path


def _weights(path: Path) -> Path | None:
    if path.is_dir():
        return path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else None
    return path if path.is_file() else None


def _split(key: str) -> tuple[str, str] | None:
    """(module path, role) of a diffusers key, or None."""
    for pattern, style in _RULES:
        match = pattern.match(key)
        if match is None:
            continue
        if style != "proc":
            return _component(match.group(1)), _ROLES[match.group(2)]
        prefix, proj, role = match.groups()
        module = _component(prefix)
        names = _PROC_TE if module.startswith("text_encoder") else _PROC
        return f"{module}.{names[proj]}", _ROLES[role]
    return None


def _component(module: str) -> str:
    """Generation (a) files lack the component prefix: they were UNet attention processors."""
    return module if _COMPONENT.match(module + ".") or _COMPONENT.match(module) else "unet." + module


def _configs(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` as {component: LoraConfig dict}."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    flat = parse_json(raw, METADATA_KEY, path)
    if not isinstance(flat, dict):
        raise FormatError(f"{METADATA_KEY} is not a JSON object", path=path)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _alphas(path: Path, groups: dict[str, dict[str, str]]) -> dict[str, float]:
    """The `<module>.alpha` scalars some converted files carry (kohya's network alphas)."""
    keys = {m: k["alpha"] for m, k in groups.items() if "alpha" in k}
    if not keys:
        return {}
    from ..io.checkpoint import Checkpoint

    with Checkpoint(path) as ckpt:
        return {m: scalar_alpha(ckpt, k, path) for m, k in keys.items()}


def _scale_rule(module: str, configs: dict[str, dict[str, Any]], alpha: float | None, findings: list[Finding]) -> Any:
    """rank → (scale, alpha, rule) for one module."""
    component, _, rel = module.partition(".")
    config = configs.get(component)

    def scale_of(rank: int) -> tuple[float, float | None, str]:
        if config is not None:
            cfg_alpha, cfg_rank = module_alpha_rank(config, rel)
            if cfg_rank != rank:
                findings.append(
                    error("config-rank", f"metadata says r={cfg_rank} but the tensors have rank {rank}", module)
                )
            rslora = bool(config.get("use_rslora"))
            return scale_from_alpha(cfg_alpha, rank, rslora), cfg_alpha, "alpha/sqrt(r)" if rslora else "alpha/r"
        if alpha:
            return alpha / rank, alpha, "alpha/r"
        return 1.0, float(rank), "alpha/r"

    return scale_of


def pipeline_module(module: str) -> bool:
    """Whether `module` is in a diffusion pipeline's component: under `transformer.`, a diffusion transformer's
    blocks (`transformer_blocks`, `single_transformer_blocks`, ...), not a language model's `transformer.h.N`."""
    if module.startswith("transformer."):
        return bool(_DIFFUSION_TRANSFORMER.match(module))
    return bool(_COMPONENT.match(module))


def _refuse_unheld(adapter: Adapter) -> None:
    for module, m in adapter.modules.items():
        if not pipeline_module(module):
            prefixes = ", ".join(c + "." for c in COMPONENTS)
            what = (
                "is a language model's, not a diffusion transformer's"
                if _COMPONENT.match(module)
                else f"has no pipeline component prefix ({prefixes})"
            )
            raise AdapterError(
                f"module {module!r} {what}",
                hint="diffusers files are for diffusion pipelines; convert to peft for other models",
            )
        if m.kind == "embedding" or m.fan_in_fan_out:
            raise AdapterError(f"module {module!r}: diffusers files cannot hold embedding LoRA or fan_in_fan_out")
    unheld = sorted(k for k in adapter.full_tensors if not keeps_full(k))
    if unheld:
        raise AdapterError(
            f"diffusers files cannot hold full tensors such as {unheld[0]!r} ({len(unheld)} in all)",
            hint="use 'loractl convert', which measures and drops them; diffusers loads only a Flux control "
            "LoRA's qk-norm scales",
        )


def _tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The file's tensors. Where a component's modules have lora biases, every one of its modules gets one (zeros:
    no change): its LoraConfig says `lora_bias`, and PEFT then leaves a missing bias uninitialised (on `meta`)."""
    out: dict[str, torch.Tensor] = {}
    biased = {m.partition(".")[0] for m, lora in adapter.modules.items() if lora.bias is not None}
    for module, m in adapter.modules.items():
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = m.A, m.B
        if m.magnitude is not None:
            out[f"{module}.lora_magnitude_vector"] = m.magnitude
        if m.bias is not None:
            out[f"{module}.lora_B.bias"] = m.bias
        elif module.partition(".")[0] in biased:
            out[f"{module}.lora_B.bias"] = m.B.new_zeros(m.out_features)
    return out | adapter.full_tensors


def _metadata_doc(adapter: Adapter) -> tuple[dict[str, Any], dict[str, float]]:
    """Flattened `<component>.<LoraConfig field>` dict, and the exact scales its alphas cannot express."""
    from dataclasses import replace

    from .peft.writer import peft_config

    fields = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")
    doc: dict[str, Any] = {}
    inexact: dict[str, float] = {}
    for component in COMPONENTS:
        mods = {m[len(component) + 1 :]: v for m, v in adapter.modules.items() if m.startswith(component + ".")}
        if not mods:
            continue
        config, scales = peft_config(replace(adapter, modules=mods, full_tensors={}))
        doc |= {f"{component}.{f}": config[f] for f in fields}
        doc[f"{component}.target_modules"] = sorted(mods)
        inexact |= {f"{component}.{m}": s for m, s in scales.items()}
    return doc, inexact
