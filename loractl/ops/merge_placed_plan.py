"""The plan of a merge into a base rewritten in its own types (a GGUF model, a single-file SD checkpoint):
where each adapter module lands (`bases._placement.Placement`), checked from headers, and one stored tensor merged.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..bases import open_base
from ..bases._placement import Placement
from ..bases.protocol import RewritableBase
from ..errors import ShapeMismatchError
from ..findings import Finding, error
from ..formats.options import ReadOptions
from ..info import AdapterInfo
from .weights import check_weights

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraModule
    from ..bases.protocol import Base, BaseTensor, OutputChoices
    from ..info import ModuleInfo
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
    kind: str  # the base's `Base.kind`: "gguf <arch>" or the single-file variant ("sd1", "sdxl", …)
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    updates: dict[str, tuple[PlacedUpdate, ...]]
    problems: tuple[Finding, ...]
    tensors_total: int
    infos: tuple[AdapterInfo, ...] = ()  # how each adapter was described (its format, its recorded base)
    stored: dict[str, BaseTensor] = field(default_factory=dict)  # each updated tensor as the base stores it
    read_options: ReadOptions | None = None  # how the adapters were read (pickle, alpha, scale)
    output: OutputChoices | None = None  # what the merge asks of the output (--dtype, --keep-quant)
    tensors_converted: int = 0  # tensors no adapter touches that the output stores converted (dequantized, cast)
    imatrix: str | None = None  # llama.cpp's importance matrix the quantized tensors are requantized with

    def check(self) -> None:
        """Raise `PlacedPlanError` listing every problem, if there is any."""
        if self.problems:
            raise PlacedPlanError(self)

    @property
    def adapter_paths(self) -> list[str]:
        return list(self.adapters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "layout": self.kind,
            "adapters": list(self.adapters),
            "weights": list(self.weights),
            "tensors_total": self.tensors_total,
            "tensors_merged": len(self.updates),
            "tensors_converted": self.tensors_converted,
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


def open_rewritable(path: str | Path, output: OutputChoices | None = None) -> RewritableBase:
    """The GGUF, single-file or quantized base at `path` (the caller knows it is one: `bases.detect_base`),
    opened for the `output` the merge asks for."""
    return cast("RewritableBase", open_base(path, output))


def plan_placed_merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
    output: OutputChoices | None = None,
    imatrix: str | Path | None = None,
) -> PlacedPlan:
    """Place every adapter module on a tensor of the base, from headers only; problems are collected.
    `imatrix` (a GGUF base only) is llama.cpp's importance matrix the quantized tensors it covers are
    requantized with (`--imatrix`)."""
    options = replace(read_options or ReadOptions(), base=None)
    rewritable = open_rewritable(base, output)
    try:
        use_imatrix(rewritable, imatrix)
        infos = [_describe(rewritable, a, format, options) for a in adapters]
        plan = plan_placements(rewritable, infos, check_weights(weights, len(adapters)), options)
        return replace(plan, output=output, imatrix=None if imatrix is None else str(imatrix))
    finally:
        rewritable.close()


def use_imatrix(base: RewritableBase, imatrix: str | Path | None) -> None:
    """Requantize `base`'s tensors with llama.cpp's importance matrix `imatrix` (a GGUF base only)."""
    from ..bases.gguf import GgufBase
    from ..errors import UsageError

    if imatrix is None:
        return
    if not isinstance(base, GgufBase):
        raise UsageError("--imatrix applies to GGUF bases (llama.cpp's importance matrix)",
                         hint="drop --imatrix for this base")  # fmt: skip
    base.use_importance(Path(imatrix))


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
            for placement in where if isinstance(where, tuple) else (where,):
                problem = _check_shape(module, m, placement, tensors[placement.key].shape)
                if problem is not None:
                    found.append(problem)
                    continue
                updates.setdefault(placement.key, []).append(PlacedUpdate(i, module, placement, weight))
        problems += [replace(f, path=str(info.path)) for f in found]
    return PlacedPlan(
        str(base.path), base.kind, tuple(str(i.path) for i in infos), tuple(weights),
        {k: tuple(v) for k, v in updates.items()}, tuple(problems), len(tensors), tuple(infos),
        {k: tensors[k] for k in updates}, read_options,
        tensors_converted=sum(t.converted for k, t in tensors.items() if k not in updates),
    )  # fmt: skip


def _describe(base: RewritableBase, path: str | Path, fmt: str | None, options: ReadOptions) -> AdapterInfo:
    from ..formats import describe_adapter, detect_format

    fmt = fmt or detect_format(path)
    return describe_adapter(path, format=fmt, options=base.read_options(fmt, options))


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
    if m.dora and (p.rows is not None or p.part is not None or p.swap_halves):
        return error("dora-fused", f"DoRA cannot be merged into a slice or reordering of {p.key!r}", module)
    from .merge_shared import stored_shape  # ΔW's shape as a Hugging Face base stores it

    expected = stored_shape(m)
    if p.part is not None:
        expected = (p.part[1] - p.part[0], *expected[1:])
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
    if p.swap_halves:
        half = module.B.shape[0] // 2
        module = replace(module, B=torch.cat([module.B[half:], module.B[:half]]))
    if p.part is not None:
        module = replace(module, B=module.B[p.part[0] : p.part[1]])
    if p.transposed:
        module = replace(module, fan_in_fan_out=not module.fan_in_fan_out)
    if p.rows is not None:
        padded = torch.zeros(rows, *module.B.shape[1:], dtype=module.B.dtype)
        padded[p.rows[0] : p.rows[1]] = module.B
        module = replace(module, B=padded)
    return module_delta(module, weight)


@dataclass(frozen=True)
class BlockFigures:
    """`TensorFigures`' sums over one block of rows."""

    weight_sq: float
    delta_sq: float
    carried: float
    error_sq: float


def block_figures(
    start: torch.Tensor, delta: torch.Tensor, merged: torch.Tensor, weight_sq: float, delta_sq: float,
    stored: torch.Tensor | None, quantized: bool,
) -> BlockFigures:  # fmt: skip
    """One block of rows, as (rows, cols) float32: W (overwritten; only read where `quantized`), ΔW, W + ΔW
    (`weight_sq` = ‖W‖², `delta_sq` = ‖ΔW‖², already taken) and what the output holds for W + ΔW (overwritten;
    None: W + ΔW itself). Per row in float32 (norms exact to float32 rounding), summed over rows in float64: a
    float64 copy of each block costs 3× the passes. A float type's stored − merged is one exact float32
    subtraction (the two are within a rounding of each other); ⟨ΔW_s, ΔW⟩ only where `quantized` (a float
    type's loss is ‖stored − merged‖: `rounding_loss`)."""
    import torch

    from .merge_kernel import rows_sq

    if stored is None:
        return BlockFigures(weight_sq, delta_sq, delta_sq, 0.0)
    if not quantized:
        return BlockFigures(weight_sq, delta_sq, 0.0, rows_sq(stored.sub_(merged)))
    moved = torch.sub(stored, start, out=start)  # the change the output carries, ΔW_s
    carried = float(torch.linalg.vecdot(moved, delta, dim=1).double().sum())
    return BlockFigures(weight_sq, delta_sq, carried, rows_sq(moved.sub_(delta)))  # stored − merged


@dataclass
class TensorFigures:
    """What the report says of one stored tensor, summed in float64 over its row blocks as they are merged
    and stored: ‖W‖², ‖ΔW‖² (ΔW = merged − start), ⟨stored − start, ΔW⟩ and ‖stored − merged‖²."""

    delta_norms: tuple[float, ...]  # ‖ΔW‖_F of each update, in order (from its factors)
    weight_sq: float = 0.0
    delta_sq: float = 0.0
    carried: float = 0.0
    error_sq: float = 0.0

    def add(self, block: BlockFigures) -> None:
        """One block's figures, blocks in row order (the float64 sums then do not depend on threads)."""
        self.weight_sq += block.weight_sq
        self.delta_sq += block.delta_sq
        self.carried += block.carried
        self.error_sq += block.error_sq

    @property
    def base_norm(self) -> float:
        return math.sqrt(self.weight_sq)

    def rounding_error(self) -> float | None:
        """‖stored − merged‖_F / ‖ΔW‖_F: how far the stored tensor is from W + ΔW, in units of ΔW (None when ΔW = 0).

        For a float type it equals the rounding loss; for a block-quantized type it also counts the noise
        that requantizing whole blocks adds, so it can pass 1: the report shows it beside the loss, so that
        a loss near 0 never hides a stored tensor that moved further than ΔW.
        """
        return math.sqrt(self.error_sq / self.delta_sq) if self.delta_sq > 0 else None

    def rounding_loss(self, quantized: bool) -> float | None:
        """The share of ΔW = merged − start that storing `merged` removes (None when ΔW = 0).

        Float types round each value on its own: the loss is ‖stored − merged‖_F / ‖ΔW‖_F. A block-quantized
        type (Q8_0, Q4_K, …) requantizes whole blocks, so storing W + ΔW also moves values ΔW does not touch
        (a new block scale): that noise is not a loss of ΔW, and the relative error can pass 100%. There the
        loss is 1 − ⟨ΔW_s, ΔW⟩ / ‖ΔW‖²_F clipped to [0, 1], ΔW_s = stored − start being the change the file
        carries: the share of ΔW that does not survive requantization (docs/merge.md).
        """
        if self.delta_sq == 0:
            return None
        if quantized:
            return 1.0 - min(1.0, max(0.0, self.carried / self.delta_sq))
        return math.sqrt(self.error_sq / self.delta_sq)
