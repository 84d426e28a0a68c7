"""Where an adapter module lands in a base stored in another layout (a GGUF model, a single-file SD checkpoint).

Adapters name modules the Hugging Face way (`model.layers.0.self_attn.q_proj`, `unet.down_blocks…`);
those bases store the same weights under other names, sometimes reordered (llama.cpp's q/k rows),
transposed, or fused (OpenCLIP's `in_proj_weight` holds q, k and v). A `Placement` says which, and
`placed_delta` turns a module into the update of that stored tensor, so the merge arithmetic
(`merge_kernel`) is the same as for any checkpoint. The plan is built from headers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import ShapeMismatchError
from ..findings import Finding, error
from ..formats._placement import Placement

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraModule
    from ..info import AdapterInfo, ModuleInfo
    from .merge_kernel import Delta


@dataclass(frozen=True)
class PlacedUpdate:
    """Adapter `adapter`'s `module`, added to `placement.key` with the adapter's weight."""

    adapter: int
    module: str
    placement: Placement
    weight: float


@dataclass(frozen=True)
class PlacedPlan:
    """Every update grouped by stored tensor, and every problem found (from headers alone)."""

    base: str
    kind: str  # "gguf" or the single-file layout ("sd1", "sdxl", …)
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    updates: dict[str, tuple[PlacedUpdate, ...]]
    problems: tuple[Finding, ...]
    tensors_total: int

    def check(self) -> None:
        """Raise `PlacedPlanError` listing every problem, if there is any."""
        if self.problems:
            raise PlacedPlanError(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "layout": self.kind,
            "adapters": list(self.adapters),
            "weights": list(self.weights),
            "tensors_total": self.tensors_total,
            "tensors_merged": len(self.updates),
            "updates": {
                k: [{"adapter": u.adapter, "module": u.module, "weight": u.weight} for u in us]
                for k, us in self.updates.items()
            },
            "problems": [{"code": p.code, "adapter": p.path, "module": p.module, "message": p.message}
                         for p in self.problems],
        }  # fmt: skip


class PlacedPlanError(ShapeMismatchError):
    """The adapters do not fit this base; carries the plan with every problem."""

    def __init__(self, plan: PlacedPlan) -> None:
        self.plan = plan
        lines = [f"  {p.path}: {p.render()}" for p in plan.problems]
        n = len(plan.problems)
        super().__init__(
            f"merging into {plan.base} ({plan.kind}): {n} problem{'s' * (n != 1)}; nothing was written:\n"
            + "\n".join(lines),
            hint="the adapters must be made for this base's model; see 'loractl inspect ADAPTER'",
        )


Resolver = Callable[[int, str, "ModuleInfo"], "Placement | Finding"]  # (adapter index, module, info)


def plan_placements(
    base: str,
    kind: str,
    infos: Sequence[AdapterInfo],
    weights: Sequence[float],
    resolve: Resolver,
    shapes: dict[str, tuple[int, ...]],
) -> PlacedPlan:
    """Place every module of every adapter with `resolve`, checking each against the stored `shapes`."""
    updates: dict[str, list[PlacedUpdate]] = {}
    problems: list[Finding] = []
    for i, (info, weight) in enumerate(zip(infos, weights, strict=True)):
        found = [*info.errors, *_unsupported(info)]
        for module, m in info.modules.items():
            where = resolve(i, module, m)
            if isinstance(where, Finding):
                found.append(where)
                continue
            problem = _check_shape(module, m, where, shapes[where.key])
            if problem is not None:
                found.append(problem)
                continue
            updates.setdefault(where.key, []).append(PlacedUpdate(i, module, where, weight))
        problems += [replace(f, path=str(info.path)) for f in found]
    return PlacedPlan(
        base, kind, tuple(str(i.path) for i in infos), tuple(weights), {k: tuple(v) for k, v in updates.items()},
        tuple(problems), len(shapes),
    )  # fmt: skip


def _unsupported(info: AdapterInfo) -> list[Finding]:
    out = [error("full-unsupported", f"full tensor {n!r} cannot be merged into this base") for n in info.full_tensors]
    out += [
        error("bias-unsupported", "lora_B.bias cannot be merged into this base", n)
        for n, m in info.modules.items()
        if m.bias
    ]
    return out


def _check_shape(module: str, m: ModuleInfo, p: Placement, stored: tuple[int, ...]) -> Finding | None:
    """None when the module's ΔW fits the stored tensor (or its rows) as placed."""
    if m.dora and p.rows is not None:
        return error("dora-fused", f"DoRA cannot be merged into a slice of the fused tensor {p.key!r}", module)
    from .merge_plan import _stored_shape  # ΔW's shape as a Hugging Face base stores it

    expected = _stored_shape(m)
    if p.transposed:
        expected = (expected[1], expected[0], *expected[2:])
    have = stored if p.rows is None else (p.rows[1] - p.rows[0], *stored[1:])
    if p.rows is not None and p.rows[1] > stored[0]:
        have = ()
    if math.prod(expected) != math.prod(have) or expected[:1] != have[:1]:
        what = f"rows {p.rows[0]}:{p.rows[1]} of " if p.rows else ""
        return error(
            "shape-mismatch", f"ΔW is {list(expected)} but {what}base tensor {p.key!r} is {list(stored)}", module
        )
    return None


def placed_delta(module: LoraModule, weight: float, p: Placement, rows: int) -> Delta:
    """`weight · module` as an update of the whole stored tensor (`rows` rows), in its stored layout."""
    import torch

    from ..formats._rope import hf_to_meta
    from .merge_kernel import module_delta

    if p.rope_heads:
        magnitude = None if module.magnitude is None else hf_to_meta(module.magnitude, p.rope_heads)
        module = replace(module, B=hf_to_meta(module.B, p.rope_heads), magnitude=magnitude)
    if p.transposed:
        module = replace(module, fan_in_fan_out=not module.fan_in_fan_out)
    if p.rows is not None:
        padded = torch.zeros(rows, *module.B.shape[1:], dtype=module.B.dtype)
        padded[p.rows[0] : p.rows[1]] = module.B
        module = replace(module, B=padded)
    return module_delta(module, weight)


@dataclass(frozen=True)
class TensorMerge:
    """One stored tensor after its updates: the exact float32 result and the figures of each update."""

    merged: torch.Tensor  # float32, in the stored layout
    base_norm: float  # ‖W‖_F
    delta_norms: tuple[float, ...]  # ‖ΔW‖_F of each update, in order
    total_delta_norm: float  # ‖Σ ΔW‖_F (from the dense difference)


def merge_tensor(start: torch.Tensor, deltas: Sequence[Delta]) -> TensorMerge:
    """W + Σ deltas in float32 (`merge_kernel.merged_float32`), and the norms the report needs."""
    from .merge_kernel import deltas_norm, merged_float32

    merged, base_norm = merged_float32(start, deltas)
    total = float((merged.double() - start.double()).norm())
    return TensorMerge(merged, base_norm, tuple(deltas_norm([d]) for d in deltas), total)


def rounding_loss(merged: torch.Tensor, stored: torch.Tensor, delta_norm: float) -> float | None:
    """‖round(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F: the share of the update the stored type removes."""
    if delta_norm == 0:
        return None
    return float((stored.double() - merged.double()).norm()) / delta_norm


@dataclass(frozen=True)
class PlacedModuleReport:
    """One merged module; `rounding_loss` is its stored tensor's (shared by every update of that tensor)."""

    adapter: int
    module: str
    tensor: str
    stored_type: str
    weight: float
    rank: int
    relative_delta: float | None  # ‖weight·ΔW‖_F / ‖W‖_F
    rounding_loss: float | None  # ‖round(W + ΣΔW) − (W + ΣΔW)‖_F / ‖ΣΔW‖_F


@dataclass(frozen=True)
class PlacedMergeReport:
    """What a merge into a GGUF or single-file base wrote."""

    output: str
    plan: PlacedPlan
    modules: tuple[PlacedModuleReport, ...]
    tensors_copied: int

    @property
    def rounding(self) -> dict[str, float] | None:
        """Median and worst rounding loss over the merged modules, as every merge reports them."""
        from .merge import rounding_summary

        return rounding_summary(m.rounding_loss for m in self.modules)

    def to_json(self) -> dict[str, Any]:
        plan = {k: v for k, v in self.plan.to_json().items() if k not in ("updates", "problems")}
        return {
            "output": self.output,
            **plan,
            "tensors_copied": self.tensors_copied,
            "rounding_loss": self.rounding,
            "modules": [asdict(m) for m in self.modules],
        }


def module_reports(
    key: str,
    stored_type: str,
    updates: Sequence[PlacedUpdate],
    ranks: Sequence[int],
    result: TensorMerge,
    loss: float | None,
) -> list[PlacedModuleReport]:
    """The report rows of one merged tensor."""
    base = result.base_norm
    return [
        PlacedModuleReport(u.adapter, u.module, key, stored_type, u.weight, r, d / base if base > 0 else None, loss)
        for u, r, d in zip(updates, ranks, result.delta_norms, strict=True)
    ]  # fmt: skip
