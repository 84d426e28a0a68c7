"""Convert an adapter between formats through the canonical model, and prove ΔW survived.

read (any format) → truncate every module (`rank`: a `RankRule`, as `resize` does; needed for a
LyCORIS LoHa/LoKr read as its exact, higher-rank LoRA) → plan (what the target holds, folds exactly,
or loses, and how much of the adapter's effect a loss carries) → refuse a loss unless allowed → write into a temporary
path → read it back → compare every module's scale·B·A with the plan in float64 → rename
into place. A refused or failed conversion leaves nothing at the output path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import lineage
from ..adapter import Adapter, LoraModule
from ..errors import AdapterError, NumericError
from ..formats import (
    FORMATS,
    check_format,
    detect_format,
    format_fills,
    format_holds,
    format_keeps_full,
    in_layout,
    load_adapter,
    save_adapter,
)
from ..formats.options import Feature, ReadOptions, WriteOptions
from ..io.atomic import atomic_output, check_output
from .algebra_result import ModuleChange
from .convert_loss import LOSS_NAMES, TRUNCATION, Loss, affected, measure_losses, truncation_loss
from .convert_verify import Verification, verify
from .lowrank import RankRule

EXACT_FOLD = 4 * 2**-24  # a measured loss within float32 rounding of the merged weights is an exact fold


@dataclass(frozen=True)
class ConversionPlan:
    """The adapter as the target will hold it, and what it took to get there."""

    adapter: Adapter
    folded: tuple[str, ...]  # exact rewrites (per-module scales into B, ranks zero-padded, rsLoRA into alpha)
    lost: tuple[Loss, ...]  # what the target cannot hold and is dropped, with its share of the effect


@dataclass(frozen=True)
class ConvertReport:
    """What `convert` did: formats, modules, folds, losses and the verification figures."""

    source: Path
    output: Path
    source_format: str
    target_format: str
    modules: int
    folded: tuple[str, ...]
    lost: tuple[Loss, ...]
    verified: bool
    max_error: float | None
    worst_module: str | None
    warnings: tuple[str, ...]
    truncated: tuple[ModuleChange, ...] = ()  # per module with `rank`: ranks and ‖ΔW − ΔW'‖_F / ‖ΔW‖_F

    def to_dict(self) -> dict[str, Any]:
        out = {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}
        return out | {"lost": [loss.to_dict() for loss in self.lost], "truncated": [vars(c) for c in self.truncated]}


def convert(
    source: str | Path,
    output: str | Path,
    *,
    to: str,
    source_format: str | None = None,
    read_options: ReadOptions | None = None,
    allow_loss: bool = False,
    verify_output: bool = True,
    force: bool = False,
    rank: RankRule | None = None,
) -> ConvertReport:
    """Convert `source` to format `to` at `output`; with `rank`, every module is first truncated to the
    rank the rule chooses (optimally, from its factors), the error per module in the report.
    `read_options` read the source (`--base`, `--allow-pickle`, `--alpha`, `--scale`); its `base` also
    measures what the target format drops, and its `alpha`, where the source records its own, is the
    target's global alpha.

    Raises:
        UsageError: unknown format, output equal to the input, a missing --base/--alpha/--scale.
        AdapterError: the target would lose part of the adapter's effect and `allow_loss` is not set
            (the message says what and how much), or nothing is left to write.
        NumericError: the read-back ΔW differs from the source's beyond tolerance (nothing written).
    """
    source, output = Path(source), Path(output)
    check_format(to, "target ")
    check_output(output, [source], force=force)
    given = read_options or ReadOptions()
    base_path, alpha, scale = given.base, given.alpha, given.scale
    src_format = source_format or detect_format(source)
    fills = format_fills(src_format) if src_format in FORMATS else frozenset()
    # --alpha fills a source that lacks it; otherwise it is only the target's global alpha
    reading = replace(given, alpha=alpha if "alpha" in fills else None)
    read = load_adapter(source, format=source_format, options=reading)
    adapter = in_layout(read, to)  # fused or split first, so --rank truncates what the target holds
    truncated: tuple[ModuleChange, ...] = ()
    cut: Loss | None = None
    if rank is not None:
        from .resize import resize

        result = resize(adapter, rank)
        cut = truncation_loss(adapter, result.report, EXACT_FOLD)
        adapter, truncated = result.adapter, result.report
    plan = plan_conversion(adapter, to, base=base_path)
    if adapter is not read:
        plan = replace(plan, folded=(*plan.folded, _relayout_note(read, adapter)))
    if cut is not None:
        plan = replace(plan, lost=(cut, *plan.lost))
    if plan.lost and not allow_loss:
        raise AdapterError(f"converting to {to} would lose {'; '.join(x.describe() for x in plan.lost)}; "
                           "nothing was written", path=source, hint=_loss_hint(plan.lost, to, read))  # fmt: skip
    params = {"from": src_format, "to": to, "alpha": alpha, "scale": scale, "allow_loss": allow_loss}
    results = {"folded": plan.folded, "lost": [x.to_dict() for x in plan.lost]}
    entry = lineage.new_entry("convert", params, [adapter.content_hash()], results)  # after a resize entry
    target = plan.adapter.with_lineage(entry)
    with atomic_output(output, force=force) as tmp:
        save_adapter(target, tmp, format=to, options=WriteOptions(base=base_path, alpha=alpha))
        check = _verify(target, tmp, to, base_path) if verify_output else None
    return ConvertReport(
        source=source,
        output=output,
        source_format=src_format,
        target_format=to,
        modules=len(target.modules),
        folded=plan.folded,
        lost=plan.lost,
        verified=check is not None,
        max_error=check.max_error if check else None,
        worst_module=check.worst if check else None,
        warnings=adapter.warnings,
        truncated=truncated,
    )


def plan_conversion(adapter: Adapter, to: str, *, base: Path | None = None) -> ConversionPlan:
    """Drop what format `to` cannot hold (measured as lost, with `base` when given) and list exact folds."""
    holds = format_holds(to)
    mods = adapter.modules
    full = {k: t for k, t in adapter.full_tensors.items() if format_keeps_full(to, k)}
    dropping = replace(adapter, full_tensors={k: t for k, t in adapter.full_tensors.items() if k not in full})
    lost: list[Feature] = [f for f in LOSS_NAMES if f not in holds and affected(dropping, f)]
    modules = {n: _strip(m, holds) for n, m in mods.items() if _kind_held(m, holds)}
    if mods and not modules:
        raise AdapterError(f"{to} can hold none of the adapter's {len(mods)} modules", hint="choose another format")
    folded = []
    if "module_scale" not in holds and len({m.scale for m in modules.values()}) > 1:
        folded.append("per-module scales folded into B against one global scale")
    if "module_rank" not in holds and len({m.rank for m in modules.values()}) > 1:
        folded.append("ranks zero-padded to the largest")
    if "rslora" not in holds and any(m.scale_rule == "alpha/sqrt(r)" for m in modules.values()):
        folded.append("rsLoRA's alpha/√r folded into the stored alpha or scale")
    target = replace(adapter, modules=modules, full_tensors=full)
    losses = measure_losses(dropping, lost, base)  # only the full tensors dropped count as lost
    exact = [x for x in losses if x.weight_change is not None and x.weight_change <= EXACT_FOLD]
    folded += [f"{x.what} ({x.count}) dropped: the merged weights on this base stay the same" for x in exact]
    return ConversionPlan(target, tuple(folded), tuple(x for x in losses if x not in exact))


def _relayout_note(read: Adapter, written: Adapter) -> str:
    """What renaming a diffusion transformer's modules into the target's layout did (exact either way)."""
    if len(written.modules) > len(read.modules):
        return f"fused projections split into diffusers' parts ({len(read.modules)} → {len(written.modules)} modules)"
    before, after = (max(m.rank for m in a.modules.values()) for a in (read, written))
    what = (
        f"; parts with different A's stacked block-diagonally, largest rank {before} → {after}"
        if after > before
        else ""
    )
    return f"diffusers' parts fused into the original projections ({len(read.modules)} → {len(written.modules)} modules{what})"


def _loss_hint(lost: tuple[Loss, ...], to: str, read: Adapter) -> str:
    """--allow-loss, the formats that would hold everything (a truncation: a higher rank), and why `to` cannot
    hold full tensors where it says (kohya)."""
    if any(x.what == TRUNCATION for x in lost):
        return "--allow-loss converts anyway and records the error per module; a higher --rank or --energy loses less"
    features = {f for f, name in LOSS_NAMES.items() if any(x.what == name for x in lost)}
    holders = [f for f in FORMATS if features <= format_holds(f) | _full_kept(f, read)]
    where = f"; {', '.join(holders)} hold{'s' * (len(holders) == 1)} it all" if holders else ""
    why = getattr(FORMATS[to], "NO_FULL_TENSORS", None) if "full_tensors" in features else None
    return f"--allow-loss converts anyway and records the loss in the report and the lineage{where}" + (
        f"; {why}" if why else ""
    )


def _full_kept(format: str, read: Adapter) -> set[Feature]:
    """{"full_tensors"} where `format` keeps every full tensor of `read` (named in its layout), else empty."""
    if not read.full_tensors:
        return set()
    held = in_layout(read, format).full_tensors
    return {"full_tensors"} if all(format_keeps_full(format, k) for k in held) else set()


def _kind_held(m: LoraModule, holds: frozenset[Feature]) -> bool:
    return m.kind == "linear" or m.kind in holds


def _strip(m: LoraModule, holds: frozenset[Feature]) -> LoraModule:
    """The module without the parts the target cannot hold."""
    return replace(
        m,
        magnitude=m.magnitude if "dora" in holds else None,
        bias=m.bias if "bias" in holds else None,
        fan_in_fan_out=m.fan_in_fan_out and "fan_in_fan_out" in holds,
    )


def _verify(target: Adapter, written: Path, to: str, base: Path | None) -> Verification:
    """Read the written output back (it records its own alpha) and compare it with what was meant to be written."""
    back = load_adapter(written, format=to, options=ReadOptions(allow_pickle=True, base=base))
    check = verify(target, back)
    if check.problems:
        more = f" (and {len(check.problems) - 1} more)" if len(check.problems) > 1 else ""
        raise NumericError(
            f"verification failed, nothing written: {check.problems[0]}{more}",
            hint="this is a loractl bug; please report it with the input file (--no-verify writes anyway)",
        )
    return check
