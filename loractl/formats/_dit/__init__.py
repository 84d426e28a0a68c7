"""Diffusion transformers (Flux, …) in their two module layouts, and the exact map between them.

A transformer LoRA names its modules either as diffusers' model does (`transformer.transformer_blocks.0.attn.to_q`,
split q/k/v) or as the original repository does (`transformer.double_blocks.0.img_attn.qkv`, fused), which is
what kohya / sd-scripts, ComfyUI and the original code read. Each format keeps the layout its file has; a
writer of the other layout calls `relayout`:

- split (original → diffusers): each part gets the fused module's A (shared, same rank) and its rows of B:
  exact, no rounding.
- fuse (diffusers → original): parts with one A (a split file) concatenate their B's (same rank, exact);
  otherwise A's stack and B is block-diagonal (rank = the sum, exact; different scales are folded into the B
  blocks, one rounding in B's dtype). A part the adapter lacks contributes zero rows.

The architectures' tables: `flux` (Flux.1), `flux2` (Flux.2), `hunyuan_video` (HunyuanVideo), `sd3` (SD3 / 3.5), `wan` (Wan 2.x); `qwen` (Qwen-Image), `ltx`
(LTX-Video) and `z_image` (Z-Image) have one layout of adapter names (diffusers'); the last two's own checkpoints
rename a few modules (`Arch.checkpoint_rules`), which only a base's names take.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from ...errors import AdapterError
from .rules import Arch, Rule

if TYPE_CHECKING:
    import torch

    from ...adapter import Adapter, LoraModule

Layout = Literal["diffusers", "original"]
COMPONENT = "transformer."


def architectures() -> tuple[Arch, ...]:
    """In the order the width rules are tried (Flux.2 and HunyuanVideo, whose names are mostly Flux.1's, before it,
    each with its own evidence: `flux2`, `hunyuan_video`): a 3072-wide attention-only adapter is Flux.1's within its 19 double
    blocks, Qwen-Image's beyond them (Qwen-Image's own names, `img_mlp`, …, are recognised first anyway)."""
    from .flux import FLUX1
    from .flux2 import FLUX2
    from .hunyuan_video import HUNYUAN_VIDEO
    from .ltx import LTX_VIDEO
    from .qwen import QWEN_IMAGE
    from .sd3 import SD3
    from .wan import WAN
    from .z_image import Z_IMAGE

    return (FLUX2, HUNYUAN_VIDEO, FLUX1, SD3, WAN, QWEN_IMAGE, LTX_VIDEO, Z_IMAGE)


@dataclass(frozen=True)
class Recognised:
    """An adapter's diffusion-transformer architecture and the layout its transformer modules are in."""

    arch: Arch
    layout: Layout


def recognise(modules: dict[str, int]) -> Recognised | None:
    """The architecture whose names the adapter's `transformer.` modules (path → input width) use.

    Names only one architecture has come first (Qwen-Image's `img_mlp` blocks also carry Flux's `txt_in`), then
    the original names of the others, then diffusers' names and the width rules, in `architectures()` order.
    """
    rels = {m[len(COMPONENT) :]: w for m, w in modules.items() if m.startswith(COMPONENT)}
    archs = architectures()
    for arch in sorted(archs, key=lambda a: bool(a.rules)):
        if arch.is_original(rels):
            return Recognised(arch, "original")
    for arch in archs:
        if arch.is_diffusers(rels):
            return Recognised(arch, "diffusers")
    return None


def describe_architecture(modules: dict[str, int], *, kohya: bool = False) -> dict[str, Any] | None:
    """What `inspect` shows of a diffusion transformer's adapter (module path → input width): the architecture,
    the layout of its names, the blocks of each kind it adapts, and the text encoders it adapts."""
    found = recognise(modules)
    if found is None:
        return None
    arch = found.arch
    rels = {m[len(COMPONENT) :]: w for m, w in modules.items() if m.startswith(COMPONENT)}
    encoders = sorted({m.split(".")[0] for m in modules if m.startswith("text_encoder")})
    return {
        "name": arch.name,
        "alike": _alike(found, list(rels), kohya=kohya),
        "layout": found.layout if arch.rules else "both",  # Qwen-Image: diffusers' names are the original ones
        "blocks": arch.block_counts(rels),
        "outside_blocks": sorted(n for n in rels if not arch.block_counts([n])),
        "text_encoders": {e: arch.text_encoders.get(e, "?") for e in encoders},
    }


def _alike(found: Recognised, names: list[str], *, kohya: bool) -> list[str]:
    """The other architectures that name every one of these modules alike, widths aside (an adapter of Flux.1's
    blocks only, ≤ 19 double and ≤ 38 single, is one of HunyuanVideo's too: nothing in it tells them apart; in a
    kohya file `img_attn_qkv` is either's)."""
    out = []
    for other in architectures():
        if other.name not in found.arch.alike or not names:
            continue
        read = [other.from_kohya(n) for n in names] if kohya else names
        match = other.match_original if found.layout == "original" else other.match_diffusers
        if all(match(n) is not None for n in read):
            out.append(other.name)
    return out


def relayout(adapter: Adapter, layout: Layout) -> Adapter:
    """`adapter` with its transformer modules in `layout`; the same adapter when it is there already."""
    found = recognise({n: m.in_features for n, m in adapter.modules.items()})
    if found is None or found.layout == layout:
        return adapter
    convert = _split_all if layout == "diffusers" else _fuse_all
    modules = dict(sorted(convert(found.arch, adapter.modules).items()))
    return replace(adapter, modules=modules, full_tensors=_renamed_norms(adapter.full_tensors, layout))


def _renamed_norms(full: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Full tensors with a Flux control LoRA's qk-norm scales named in `layout` (the others as they are)."""
    from .flux import norm_name

    out = {}
    for key, t in full.items():
        renamed = norm_name(key[len(COMPONENT) :], layout) if key.startswith(COMPONENT) else None
        out[COMPONENT + renamed if renamed else key] = t
    return out


def _split_all(arch: Arch, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    out: dict[str, LoraModule] = {}
    match_original = arch.match_checkpoint if arch.adapters_split_checkpoint_names else arch.match_original
    for name, m in modules.items():
        match = match_original(name[len(COMPONENT) :]) if name.startswith(COMPONENT) else None
        if match is None:
            out[name] = m
            continue
        rule, index = match
        for part, piece in zip(rule.diffusers_names(index), _split(rule, name, m), strict=True):
            out[COMPONENT + part] = piece
    return out


def _split(rule: Rule, name: str, m: LoraModule) -> list[LoraModule]:
    """The parts of a fused module: A shared, B's rows by the rule's proportions."""
    import torch

    if m.magnitude is not None or m.kind != "linear":
        raise AdapterError(f"module {name!r}: a fused {m.kind} module with DoRA cannot be split into diffusers' parts")
    b = _swapped(m.B) if rule.swaps(m.out_features, m.in_features) else m.B
    sizes = rule.sizes(out_features=m.out_features)
    biases = torch.split(m.bias, sizes) if m.bias is not None else [None] * len(sizes)
    return [
        replace(m, B=rows.contiguous(), bias=None if bias is None else bias.contiguous())
        for rows, bias in zip(torch.split(b, sizes), biases, strict=True)
    ]


def _fuse_all(arch: Arch, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    groups: dict[str, dict[int, LoraModule]] = {}
    rules: dict[str, Rule] = {}
    out: dict[str, LoraModule] = {}
    for name, m in modules.items():
        match = arch.match_diffusers(name[len(COMPONENT) :]) if name.startswith(COMPONENT) else None
        if match is None:
            out[name] = m
            continue
        rule, index, part = match
        fused = COMPONENT + rule.original_name(index)
        groups.setdefault(fused, {})[part] = m
        rules[fused] = rule
    for fused, parts in groups.items():
        out[fused] = _fuse(rules[fused], fused, parts)
    return out


def _fuse(rule: Rule, name: str, parts: dict[int, LoraModule]) -> LoraModule:
    """One original module from its diffusers parts (see the package docstring)."""
    import torch

    if len(rule.parts) == 1:
        m = parts[0]
        return replace(m, B=_swapped(m.B)) if rule.swaps(m.out_features, m.in_features) else m
    first = next(iter(parts.values()))
    if any(p.magnitude is not None or p.kind != "linear" for p in parts.values()):
        raise AdapterError(f"module {name!r}: diffusers' parts with DoRA cannot be fused into the original module")
    sizes = rule.sizes(known={i: p.out_features for i, p in parts.items()})
    shared = all(p.A is first.A or torch.equal(p.A, first.A) for p in parts.values())
    if shared and len({p.scale for p in parts.values()}) == 1:
        blocks = [parts[i].B if i in parts else first.B.new_zeros(size, first.rank) for i, size in enumerate(sizes)]
        return replace(first, B=torch.cat(blocks), bias=_bias(parts, sizes))
    a = torch.cat([parts[i].A for i in sorted(parts)])
    b = a.new_zeros(sum(sizes), a.shape[0], dtype=first.B.dtype)
    row, col = 0, 0
    for i, size in enumerate(sizes):
        if i in parts:
            p = parts[i]
            block = p.B if p.scale == first.scale else (p.B.double() * (p.scale / first.scale)).to(p.B.dtype)
            b[row : row + size, col : col + p.rank] = block
            col += p.rank
        row += size
    return replace(first, A=a, B=b, alpha=first.scale * a.shape[0], bias=_bias(parts, sizes))


def _bias(parts: dict[int, LoraModule], sizes: list[int]) -> torch.Tensor | None:
    import torch

    if all(p.bias is None for p in parts.values()):
        return None
    scale = next(iter(parts.values())).scale
    like = next(p.bias for p in parts.values() if p.bias is not None)
    pieces = [
        (p.bias.double() * (p.scale / scale)).to(like.dtype) if (p := parts.get(i)) and p.bias is not None
        else like.new_zeros(size)
        for i, size in enumerate(sizes)
    ]  # fmt: skip
    return torch.cat(pieces)


def _swapped(b: torch.Tensor) -> torch.Tensor:
    """B with its two row halves exchanged: the final AdaLN's (shift, scale) ↔ diffusers' (scale, shift)."""
    import torch

    half = b.shape[0] // 2
    return torch.cat([b[half:], b[:half]])
