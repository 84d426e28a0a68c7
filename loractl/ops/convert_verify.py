"""Did the weight change survive the conversion? Per-module ΔW distance without forming ΔW.

‖s₁B₁A₁ − s₂B₂A₂‖_F comes from the factors (`lowrank.factored_distance`, as `diff` computes it):
O((out + in)·r²) in float64 instead of an (out × in) matrix per module, so an embedding LoRA on a
150k vocabulary is verified in kilobytes. Equal factors give exactly 0: a bit-identical copy reports 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapter import Adapter, LoraModule
from .linalg import factored_frobenius
from .lowrank import factored_distance

FLOAT32_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Verification:
    """Largest relative differences between a source adapter and what was read back."""

    max_error: float  # over modules: ‖ΔW_out − ΔW_src‖_F / ‖ΔW_src‖_F, and other tensors likewise
    worst: str | None  # the module (or full tensor) where it occurs
    problems: tuple[str, ...]  # every difference beyond its tolerance, or structural mismatch


def verify(source: Adapter, written: Adapter) -> Verification:
    """Compare every module's scale·B·A (and magnitudes, biases, full tensors) of `written` with `source`."""
    problems = [f"module {n!r} is missing from the output" for n in source.modules if n not in written.modules]
    problems += [f"module {n!r} appeared in the output" for n in written.modules if n not in source.modules]
    problems += [
        f"full tensor {k!r} is missing from the output" for k in source.full_tensors if k not in written.full_tensors
    ]
    worst, max_error = None, 0.0
    for name, errors in _errors(source, written):
        for what, err, tol in errors:
            if err > max_error or math.isnan(err):
                worst, max_error = name, err
            if not err <= tol:
                problems.append(f"{what} of {name!r} differs by {err:.3g} relative (tolerance {tol:.1g})")
    return Verification(max_error, worst, tuple(problems))


def delta_error(src: LoraModule, out: LoraModule) -> float:
    """‖ΔW_out − ΔW_src‖_F / ‖ΔW_src‖_F in float64 (absolute when ΔW_src is zero)."""
    a1, b1 = src.A.flatten(1).double(), src.B.flatten(1).double() * src.scale
    a2, b2 = out.A.flatten(1).double(), out.B.flatten(1).double() * out.scale
    if a1.shape[1:] != a2.shape[1:] or b1.shape[0] != b2.shape[0]:
        return math.inf
    diff = factored_distance(b1, a1, b2, a2)
    norm = factored_frobenius(b1, a1)
    return diff / norm if norm > 0 else diff


def tolerance(*tensors: torch.Tensor) -> float:
    """1e-6 relative, or the rounding of the coarsest floating dtype involved (bf16, fp16)."""
    eps = [torch.finfo(t.dtype).eps for t in tensors if t.dtype.is_floating_point]
    return max([FLOAT32_TOLERANCE, *eps])


def _errors(source: Adapter, written: Adapter) -> list[tuple[str, list[tuple[str, float, float]]]]:
    out = []
    for name, src in source.modules.items():
        got = written.modules.get(name)
        if got is None:
            continue
        tol = tolerance(src.A, src.B, got.A, got.B)
        errors = [("ΔW", delta_error(src, got), tol)]
        if got.kind != src.kind:
            errors.append((f"kind ({src.kind} → {got.kind})", math.inf, tol))
        for role in ("magnitude", "bias"):
            a, b = getattr(src, role), getattr(got, role)
            if a is not None or b is not None:
                errors.append((role, _tensor_error(a, b), tolerance(*(t for t in (a, b) if t is not None))))
        out.append((name, errors))
    for key, t in source.full_tensors.items():
        if key in written.full_tensors:
            got_t = written.full_tensors[key]
            out.append((key, [("full tensor", _tensor_error(t, got_t), tolerance(t, got_t))]))
    return out


def _tensor_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return math.inf
    norm = float(a.double().norm())
    diff = float((a.double() - b.double()).norm())
    return diff / norm if norm > 0 else diff
