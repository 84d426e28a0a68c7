"""Where an adapter module lands in a base stored in another layout (a GGUF model, a single-file SD checkpoint).

Adapters name modules the Hugging Face way (`model.layers.0.self_attn.q_proj`, `unet.down_blocks…`);
those bases store the same weights under other names, sometimes reordered (llama.cpp's q/k rows),
transposed, or fused (OpenCLIP's `in_proj_weight` holds q, k and v). A `Placement` says which, and
`placed_delta` turns a module into the update of that stored tensor, so the merge arithmetic
(`merge_kernel`) is the same as for any checkpoint. The plan is built from headers only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..bases._placement import Placement
from ..errors import ShapeMismatchError
from ..findings import Finding, error
from .merge_shared import ROUNDING_WARN, figures_json, round_figure, rounding_summary

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraModule
    from ..bases.protocol import Base, BaseTensor
    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from .merge_kernel import Delta


VANISH = 0.5  # a type keeping less of a ΔW than this: the update is smaller than its quantization step


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
    kind: str  # "gguf <arch>" or the single-file layout ("sd1", "sdxl", …)
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    updates: dict[str, tuple[PlacedUpdate, ...]]
    problems: tuple[Finding, ...]
    tensors_total: int
    infos: tuple[AdapterInfo, ...] = ()  # how each adapter was described (its format, its recorded base)
    stored: dict[str, BaseTensor] = field(default_factory=dict)  # each updated tensor as the base stores it
    read_options: ReadOptions | None = None  # how the adapters were read (pickle, alpha, scale)
    imatrix: str | None = None  # llama.cpp's importance matrix the quantized tensors are requantized with

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


def plan_placements(
    base: Base, infos: Sequence[AdapterInfo], weights: Sequence[float], read_options: ReadOptions
) -> PlacedPlan:
    """Place every module of every adapter with `base.place`, checking each against the stored shapes."""
    tensors = base.tensors()
    updates: dict[str, list[PlacedUpdate]] = {}
    problems: list[Finding] = []
    for i, (info, weight) in enumerate(zip(infos, weights, strict=True)):
        found = [*info.errors, *_unsupported(info)]
        for module, m in info.modules.items():
            where = base.place(module, m, info)
            if isinstance(where, Finding):
                found.append(where)
                continue
            problem = _check_shape(module, m, where, tensors[where.key].shape)
            if problem is not None:
                found.append(problem)
                continue
            updates.setdefault(where.key, []).append(PlacedUpdate(i, module, where, weight))
        problems += [replace(f, path=str(info.path)) for f in found]
    return PlacedPlan(
        str(base.path), base.kind, tuple(str(i.path) for i in infos), tuple(weights),
        {k: tuple(v) for k, v in updates.items()}, tuple(problems), len(tensors), tuple(infos),
        {k: tensors[k] for k in updates}, read_options,
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
    from .merge_shared import stored_shape  # ΔW's shape as a Hugging Face base stores it

    expected = stored_shape(m)
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


def merge_tensor(start: torch.Tensor, deltas: Sequence[Delta], device: torch.device | None = None) -> TensorMerge:
    """W + Σ deltas in float32 (`merge_kernel.merged_float32`, on `device`), and the norms the report needs."""
    from .merge_kernel import deltas_norm, merged_float32

    merged, base_norm = merged_float32(start, deltas, device)
    total = float((merged.double() - start.double()).norm())
    return TensorMerge(merged, base_norm, tuple(deltas_norm([d]) for d in deltas), total)


def rounding_error(start: torch.Tensor, merged: torch.Tensor, stored: torch.Tensor) -> float | None:
    """‖stored − merged‖_F / ‖ΔW‖_F: how far the stored tensor is from W + ΔW, in units of ΔW (None when ΔW = 0).

    For a float type it equals the rounding loss; for a block-quantized type it also counts the noise
    that requantizing whole blocks adds, so it can pass 1: the report shows it beside the loss, so that
    a loss near 0 never hides a stored tensor that moved further than ΔW.
    """
    delta_norm = float((merged.double() - start.double()).norm())
    return float((stored.double() - merged.double()).norm()) / delta_norm if delta_norm > 0 else None


def rounding_loss(start: torch.Tensor, merged: torch.Tensor, stored: torch.Tensor, quantized: bool) -> float | None:
    """The share of ΔW = merged − start that storing `merged` removes (None when ΔW = 0).

    Float types round each value on its own: the loss is ‖stored − merged‖_F / ‖ΔW‖_F. A block-quantized
    type (Q8_0, Q4_K, …) requantizes whole blocks, so storing W + ΔW also moves values ΔW does not touch
    (a new block scale): that noise is not a loss of ΔW, and the relative error can pass 100%. There the
    loss is 1 − ⟨ΔW_s, ΔW⟩ / ‖ΔW‖²_F clipped to [0, 1], ΔW_s = stored − start being the change the file
    carries: the share of ΔW that does not survive requantization (docs/merge.md).
    """
    delta = merged.double() - start.double()
    norm_sq = float(delta.square().sum())
    if norm_sq == 0:
        return None
    if quantized:
        carried = float(((stored.double() - start.double()) * delta).sum()) / norm_sq
        return 1.0 - min(1.0, max(0.0, carried))
    return float((stored.double() - merged.double()).norm()) / math.sqrt(norm_sq)


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
    rounding_loss: float | None  # the share of ΣΔW the stored type removes (`rounding_loss`)
    rounding_error: float | None = None  # ‖stored − (W + ΣΔW)‖ / ‖ΣΔW‖ (`rounding_error`)


@dataclass(frozen=True)
class PlacedMergeReport:
    """What a merge into a GGUF or single-file base wrote; `fingerprints[i]` is the base fingerprint over
    adapter i's weights (None where the base's stored values cannot give it: quantized tensors)."""

    output: str
    plan: PlacedPlan
    modules: tuple[PlacedModuleReport, ...]
    tensors_copied: int
    fingerprints: tuple[str | None, ...] = ()
    adapter_hashes: tuple[str, ...] = ()
    base_notes: tuple[str, ...] = ()  # a base recognised in another dtype, a mismatch allowed, a check not possible
    files: tuple[str, ...] = ()  # every file written: `output`, or each shard of a split GGUF from `output` on

    @property
    def rounding(self) -> dict[str, float] | None:
        """Median and worst rounding loss over the merged modules, as every merge reports them."""
        return rounding_summary(m.rounding_loss for m in self.modules)

    @property
    def worst_rounding_error(self) -> float | None:
        """The largest `rounding_error` over the merged modules (None when none has one)."""
        return max((m.rounding_error for m in self.modules if m.rounding_error is not None), default=None)

    @property
    def rounding_by_type(self) -> dict[str, dict[str, float]]:
        """Per stored type (F16, Q8_0, Q4_K, …): the merged modules on it, and the share of their ΔW the stored
        tensors carry, 1 − `rounding_loss` (median and worst)."""
        kept: dict[str, list[float]] = {}
        for m in self.modules:
            if m.rounding_loss is not None:
                kept.setdefault(m.stored_type, []).append(1.0 - m.rounding_loss)
        return {
            kind: {"modules": len(xs), "survives_median": round_figure(sorted(xs)[len(xs) // 2]) or 0.0,
                   "survives_worst": round_figure(min(xs)) or 0.0}
            for kind, xs in sorted(kept.items())
        }  # fmt: skip

    @property
    def warnings(self) -> list[str]:
        """Per stored type whose worst loss passes `ROUNDING_WARN`: how much of ΔW survives, why when most of it
        vanishes (ΔW smaller than the type's step), and the ways out."""
        out = []
        for kind, kept in self.rounding_by_type.items():
            if 1.0 - kept["survives_worst"] <= ROUNDING_WARN:
                continue
            line = (f"rounding into {kind}: {kept['survives_worst']:.0%} of a module's ΔW survives at worst "
                    f"({kept['survives_median']:.0%} median)")  # fmt: skip
            if kept["survives_worst"] < VANISH:
                m = max((m for m in self.modules if m.stored_type == kind and m.rounding_loss is not None),
                        key=lambda m: m.rounding_loss or 0.0)  # fmt: skip
                if m.relative_delta and m.rounding_error:
                    line += (f"; {m.module}'s ΔW is {m.relative_delta:.2%} of ‖W‖, smaller than a {kind} step "
                             f"(requantizing moves W by {m.rounding_error * m.relative_delta:.2%} of ‖W‖), so it "
                             "mostly vanishes")  # fmt: skip
            out.append(line + "; merge into an F16/F32 GGUF (convert_hf_to_gguf.py --outtype f16), or the Hugging "
                       "Face checkpoint with --dtype float16, or apply the adapter at run time")  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        plan = {k: v for k, v in self.plan.to_json().items() if k not in ("updates", "problems")}
        return {
            "output": self.output,
            **plan,
            "tensors_copied": self.tensors_copied,
            "worst_rounding_error": self.worst_rounding_error,
            "rounding_by_type": self.rounding_by_type,
            "files": list(self.files) or [self.output],
            **figures_json(self),
        }


def module_reports(
    key: str,
    stored_type: str,
    updates: Sequence[PlacedUpdate],
    ranks: Sequence[int],
    result: TensorMerge,
    loss: float | None,
    error: float | None = None,
) -> list[PlacedModuleReport]:
    """The report rows of one merged tensor."""
    base = result.base_norm
    return [
        PlacedModuleReport(u.adapter, u.module, key, stored_type, u.weight, r, d / base if base > 0 else None, loss,
                           error)
        for u, r, d in zip(updates, ranks, result.delta_norms, strict=True)
    ]  # fmt: skip
