"""LyCORIS LoHa and LoKr modules in kohya-style files, read as the exact LoRA they equal (FORMATS.md §8).

LoHa stores ΔW = s · (w1_a·w1_b) ⊙ (w2_a·w2_b), LoKr ΔW = s · kron(w1, w2) with each of w1, w2 full
or a pair `_a·_b` (conv: optionally through a Tucker core `_t`). Neither is a LoRA of the same rank,
but both are a LoRA of a known higher rank, with factors built from the stored ones without forming ΔW:

    (U₁V₁) ⊙ (U₂V₂) = B·A   B[o, (i,j)] = U₁[o,i]·U₂[o,j],  A[(i,j), n] = V₁[i,n]·V₂[j,n]   rank r₁·r₂
    kron(P₁Q₁, P₂Q₂) = kron(P₁, P₂) · kron(Q₁, Q₂)                                       rank k₁·k₂

(a full side is I·w or w·I, whichever is narrower). A product that would reach min(out, in) is
held as the dense ΔW times an identity. So every command reads LoHa/LoKr through the one canonical
adapter: `convert` writes the exact LoRA or truncates it (`--rank`, `--energy`) by the exact SVD of
the factors, `merge` applies it in its float32 kernel, `resize` shrinks it.

Scale (LyCORIS' `loha.py`/`lokr.py`, as its forward pass and ComfyUI apply it): alpha/r with r the
rank of the `_b` factor (`hada_w1_b`, `lokr_w1_b` or else `lokr_w2_b`), alpha 0 or missing meaning
alpha = r; a LoKr whose w1 and w2 are both full has scale 1 whatever its alpha. `scalar` is folded
into w1 by LyCORIS when it saves; rank dropout and its `rank_dropout_scale` act in training only.
A conv LoHa/LoKr without Tucker stores its kernel flattened into the `_b` factor (`(r, in·k·k)`):
the base's weight shape (`--base`) says the kernel; without it, a module named like a convolution is
refused and the others read as linear.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from ...findings import Finding, error
from ...info import Factor, ModuleInfo, Structure
from ...io.safetensors_header import TensorInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from ...adapter import LoraModule

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ROLES = frozenset(LOHA + LOKR)

Shape = tuple[int, ...]
Algo = Literal["LoHa", "LoKr"]


def is_lycoris(roles: dict[str, str]) -> bool:
    """Whether a module's roles are LoHa/LoKr tensors."""
    return any(r in ROLES for r in roles)


def module_info(
    module: str,
    roles: dict[str, str],
    entries: dict[str, TensorInfo],
    alpha: float | None,
    base_shape: Shape | None,
    findings: list[Finding],
) -> ModuleInfo | None:
    """Describe one LoHa/LoKr module from its header entries; problems become findings (None)."""
    shapes = {role: tuple(entries[key].shape) for role, key in roles.items()}
    algo: Algo = "LoHa" if any(r.startswith("hada_") for r in roles) else "LoKr"
    if algo == "LoHa" and any(r.startswith("lokr_") for r in roles):
        findings.append(error("lycoris-mixed", "hada_* and lokr_* tensors in one module", module))
        return None
    try:
        layout = _loha(shapes) if algo == "LoHa" else _lokr(shapes)
    except _Bad as bad:
        findings.append(error("lycoris-shape", f"{algo}: {bad}", module))
        return None
    out, in_flat, kernel, w1, w2, rank_of_scale = layout
    in_features = in_flat // math.prod(kernel) if kernel else in_flat
    if not kernel and base_shape is not None and len(base_shape) > 2:
        if base_shape[0] != out or math.prod(base_shape[1:]) != in_flat:
            findings.append(
                error(
                    "lycoris-shape",
                    f"{algo} ΔW is ({out}, {in_flat}) but the base weight is {list(base_shape)}",
                    module,
                )
            )
            return None
        in_features, kernel = base_shape[1], tuple(base_shape[2:])
        k = math.prod(kernel)  # the sides' input parts held the kernel: (out, in·k·k) → (out, in)
        w2 = replace(w2, shape=(w2.shape[0], w2.shape[1] // k))
        w1 = replace(w1, shape=(w1.shape[0], w1.shape[1] // k)) if algo == "LoHa" else w1
    elif not kernel and base_shape is None and "conv" in module.rsplit(".", 1)[-1]:
        findings.append(
            error(
                "lycoris-kernel",
                f"{algo} stores this convolution's kernel flattened ({in_flat} inputs): give --base to read its shape",
                module,
            )
        )
        return None
    if algo == "LoKr" and w1.rank is None and w2.rank is None:
        scale, rule = 1.0, "unit"
    else:
        scale, rule = (alpha / rank_of_scale if alpha else 1.0), "alpha/r"
    rank = min(_product_rank(algo, w1, w2), out, in_flat)
    structure = Structure(algo, w1, w2, kernel)
    return ModuleInfo(
        kind="conv" if kernel else "linear",
        rank=rank,
        in_features=in_features,
        out_features=out,
        scale=scale,
        alpha=alpha,
        scale_rule=rule,  # type: ignore[arg-type]
        fan_in_fan_out=False,
        keys=dict(roles),
        shapes=shapes,
        dtypes={role: entries[key].dtype for role, key in roles.items()},
        structure=structure,
    )


class _Bad(ValueError):
    """A LoHa/LoKr module whose tensors do not fit together."""


_Layout = tuple[int, int, Shape, Factor, Factor, int]  # out, in·k…, kernel (when stored), w1, w2, rank of the scale


def _loha(s: dict[str, Shape]) -> _Layout:
    missing = [r for r in LOHA[:4] if r not in s]
    if missing:
        raise _Bad(f"missing {', '.join(missing)}")
    if ("hada_t1" in s) != ("hada_t2" in s):
        raise _Bad("hada_t1 and hada_t2 come together")
    if "hada_t1" in s:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, *k)
        sides = [_tucker(s[f"hada_w{i}_a"], s[f"hada_w{i}_b"], s[f"hada_t{i}"]) for i in (1, 2)]
        (o1, i1, k1), (o2, i2, k2) = sides
        if (o1, i1, k1) != (o2, i2, k2):
            raise _Bad("the two Hadamard halves have different shapes")
        w1 = Factor((o1, i1), s["hada_w1_b"][0], tucker=True)
        w2 = Factor((o2, i2), s["hada_w2_b"][0], tucker=True)
        return o1, i1 * math.prod(k1), k1, w1, w2, s["hada_w1_b"][0]
    halves = [_pair(s[f"hada_w{i}_a"], s[f"hada_w{i}_b"], f"hada_w{i}") for i in (1, 2)]
    (o1, n1, k1), (o2, n2, k2) = halves
    if (o1, n1, k1) != (o2, n2, k2):
        raise _Bad("the two Hadamard halves have different shapes")
    w1 = Factor((o1, n1 // max(math.prod(k1), 1)), s["hada_w1_b"][0])
    w2 = Factor((o2, n2 // max(math.prod(k2), 1)), s["hada_w2_b"][0])
    return o1, n1, k1, w1, w2, s["hada_w1_b"][0]


def _lokr(s: dict[str, Shape]) -> _Layout:
    if "lokr_w1" in s:
        if len(s["lokr_w1"]) != 2:
            raise _Bad(f"lokr_w1 is {list(s['lokr_w1'])}, expected 2-D")
        w1 = Factor((s["lokr_w1"][0], s["lokr_w1"][1]), None)
    elif "lokr_w1_a" in s and "lokr_w1_b" in s:
        a, n, k = _pair(s["lokr_w1_a"], s["lokr_w1_b"], "lokr_w1")
        if k:
            raise _Bad("lokr_w1_b must be 2-D")
        w1 = Factor((a, n), s["lokr_w1_b"][0])
    else:
        raise _Bad("neither lokr_w1 nor lokr_w1_a + lokr_w1_b")
    kernel: Shape
    if "lokr_w2" in s:
        w2s = s["lokr_w2"]
        if len(w2s) < 2:
            raise _Bad(f"lokr_w2 is {list(w2s)}")
        kernel, w2 = tuple(w2s[2:]), Factor((w2s[0], w2s[1]), None)
        n2 = math.prod(w2s[1:])
    elif "lokr_t2" in s and "lokr_w2_a" in s and "lokr_w2_b" in s:
        c, d, kernel = _tucker(s["lokr_w2_a"], s["lokr_w2_b"], s["lokr_t2"])
        w2, n2 = Factor((c, d), s["lokr_w2_b"][0], tucker=True), d * math.prod(kernel)
    elif "lokr_w2_a" in s and "lokr_w2_b" in s:
        c, n2, kernel = _pair(s["lokr_w2_a"], s["lokr_w2_b"], "lokr_w2")
        w2 = Factor((c, n2 // max(math.prod(kernel), 1)), s["lokr_w2_b"][0])
    else:
        raise _Bad("neither lokr_w2 nor lokr_w2_a + lokr_w2_b")
    rank = w1.rank if w1.rank is not None else (w2.rank or 0)
    return w1.shape[0] * w2.shape[0], w1.shape[1] * n2, kernel, w1, w2, rank


def _pair(a: Shape, b: Shape, name: str) -> tuple[int, int, Shape]:
    """(out, in·k…, kernel when b is stored unflattened) of a `_a (out, r)` · `_b (r, in[, k…])` pair."""
    if len(a) != 2 or len(b) < 2 or a[1] != b[0] or a[1] == 0:
        raise _Bad(f"{name}_a {list(a)} and {name}_b {list(b)} do not multiply")
    return a[0], math.prod(b[1:]), tuple(b[2:])


def _tucker(a: Shape, b: Shape, t: Shape) -> tuple[int, int, Shape]:
    """(out, in, kernel) of a Tucker side: `_a (r, out)`, `_b (r, in)`, core `t (r, r, *k)`."""
    if len(a) != 2 or len(b) != 2 or len(t) < 3 or t[0] != a[0] or t[1] != b[0]:
        raise _Bad(f"Tucker core {list(t)} does not fit {list(a)} and {list(b)}")
    return a[1], b[1], tuple(t[2:])


def _product_rank(algo: Algo, w1: Factor, w2: Factor) -> int:
    """The rank of the exact LoRA: r₁·r₂ (LoHa), or the product of the sides' ranks (LoKr; a full side
    counts its narrower dimension)."""
    if algo == "LoHa":
        return (w1.rank or 0) * (w2.rank or 0)
    return _side_rank(w1) * _side_rank(w2)


def _side_rank(f: Factor) -> int:
    return f.rank if f.rank is not None else min(f.shape)


# --- the exact factors (torch) -------------------------------------------------------------------


def exact_factors(info: ModuleInfo, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in the canonical layout (conv: A (R, in, *k), B (out, R, 1, …)) with B·A = ΔW / scale,
    computed in float64 and returned in float32 (float64 stays float64)."""
    import torch

    assert info.structure is not None
    t = {role: x.double() for role, x in tensors.items() if role in ROLES}
    if info.structure.algo == "LoHa":
        u1, v1 = _loha_side(t, 1)
        u2, v2 = _loha_side(t, 2)
        b = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
        a = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    else:
        p1, q1 = _lokr_w1(t)
        p2, q2 = _lokr_w2(t)
        b, a = _kron(p1, p2), _kron(q1, q2)
    if b.shape[1] >= min(b.shape[0], a.shape[1]):
        b, a = _full(b @ a)  # as wide as the matrix: the dense ΔW itself, times an identity
    dtype = torch.float64 if all(x.dtype == torch.float64 for x in tensors.values()) else torch.float32
    k, kernel = a.shape[0], info.structure.kernel
    a = a.reshape(k, info.in_features, *kernel).to(dtype).contiguous()
    b = b.reshape(info.out_features, k, *[1] * len(kernel)).to(dtype).contiguous()
    return a, b


def exact_lora(m: ModuleInfo, get: Callable[[str], torch.Tensor]) -> LoraModule:
    """The LoRA a LoHa/LoKr module equals (`exact_factors`), alpha = scale·rank; a `magnitude` role is its DoRA's."""
    from ...adapter import LoraModule

    tensors = {role: get(key) for role, key in m.keys.items()}
    a, b = exact_factors(m, tensors)
    rank = int(a.shape[0])
    return LoraModule(A=a, B=b, scale=m.scale, alpha=m.scale * rank, kind=m.kind, magnitude=tensors.get("magnitude"))


def _kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """kron of two matrices by broadcasting (torch 2.13's `kron` fails on a transposed (n, 1) view)."""
    return (x[:, None, :, None] * y[None, :, None, :]).reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1])


def _loha_side(t: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, r), V (r, in·k…) with U·V one Hadamard half (Tucker: rebuilt as LyCORIS' einsum does)."""
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    core = t.get(f"hada_t{i}")
    if core is None:
        return a, b.flatten(1)
    return a.T, _through_core(core, b)


def _lokr_w1(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "lokr_w1" in t:
        return _full(t["lokr_w1"])
    return t["lokr_w1_a"], t["lokr_w1_b"]


def _lokr_w2(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "lokr_w2" in t:
        return _full(t["lokr_w2"].flatten(1))
    if "lokr_t2" in t:
        return t["lokr_w2_a"].T, _through_core(t["lokr_t2"], t["lokr_w2_b"])
    return t["lokr_w2_a"], t["lokr_w2_b"].flatten(1)


def _through_core(core: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σⱼ t[i, j, k…]·b[j, n] as (r, n·k…): `rebuild_tucker`'s contraction of the input side."""
    import torch

    return torch.einsum("ij...,jn->in...", core, b).flatten(1)


def _full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as I·w or w·I, whichever has the smaller inner dimension."""
    import torch

    rows, cols = w.shape
    if rows <= cols:
        return torch.eye(rows, dtype=w.dtype), w
    return w, torch.eye(cols, dtype=w.dtype)
