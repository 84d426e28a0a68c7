"""Rescale: change an adapter's strength, or re-express the same ΔW under another alpha.

`scale` multiplies every ΔW (and LoRA bias) by S by changing only the module scale: the
factors keep their bytes. `alpha` keeps ΔW and folds the change of scale into B
(B' = B · s / s'), so a trainer or a tool that reads alpha sees the same update.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .. import lineage
from ..adapter import Adapter, LoraModule
from ..errors import AdapterError, UsageError
from ..info import scale_from_alpha
from .algebra_result import AlgebraResult, ModuleChange
from .lowrank import alpha_for


def rescale(adapter: Adapter, *, scale: float | None = None, alpha: float | None = None) -> AlgebraResult:
    """Multiply ΔW by `scale`, or keep ΔW and set every module's alpha to `alpha`; exactly one of them."""
    if (scale is None) == (alpha is None):
        raise UsageError("give exactly one of scale and alpha", hint="--to-scale 0.5 halves ΔW; --to-alpha 16 keeps it")
    value = scale if scale is not None else alpha
    assert value is not None
    if not math.isfinite(value) or value == 0:
        raise UsageError(
            f"{'scale' if scale is not None else 'alpha'} must be finite and non-zero, got {value}",
            hint="--to-scale 0.5 halves ΔW, --to-scale -1 negates it; to drop an adapter, do not apply it",
        )
    adapter.check()
    if scale is not None:
        modules = {name: _scaled(name, m, scale) for name, m in adapter.modules.items()}
    else:
        modules = {name: _realpha(m, value) for name, m in adapter.modules.items()}
    report = tuple(ModuleChange(name, m.rank, m.rank, 0.0) for name, m in adapter.modules.items())
    warnings: tuple[str, ...] = ()
    if scale is not None and adapter.full_tensors:
        warnings = ("full tensors (modules_to_save) replace weights and are copied unscaled",)
    params = {"scale": scale} if scale is not None else {"alpha": alpha}
    out = replace(adapter, modules=modules, warnings=())
    entry = lineage.new_entry("rescale", params, [adapter.content_hash()])
    return AlgebraResult(out.with_lineage(entry), report, warnings)


def _scaled(name: str, m: LoraModule, factor: float) -> LoraModule:
    if m.magnitude is not None:
        raise AdapterError(
            f"module {name!r} is DoRA: its update is renormalized by the magnitude vector, so scaling it is not "
            "a multiple of ΔW",
            hint="use --to-alpha to re-express it, or merge it into the base and extract a plain LoRA",
        )
    new = m.scale * factor
    return replace(m, scale=new, alpha=alpha_for(new, m.rank, m.scale_rule))


def _realpha(m: LoraModule, alpha: float) -> LoraModule:
    rule = m.scale_rule if m.scale_rule == "alpha/sqrt(r)" else "alpha/r"
    new = scale_from_alpha(alpha, m.rank, rslora=rule == "alpha/sqrt(r)")
    ratio = m.scale / new
    bias = None if m.bias is None else (m.bias.double() * ratio).to(m.bias.dtype)
    b = (m.B.double() * ratio).to(m.B.dtype)
    return replace(m, B=b, bias=bias, scale=new, alpha=alpha, scale_rule=rule)
