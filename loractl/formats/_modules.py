"""Shared by the single-file readers (kohya, diffusers, mlx): keys grouped by module → `ModuleInfo`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import lineage
from ..errors import FormatError
from ..findings import Finding, error
from ..info import ModuleInfo, ModuleKind, ScaleRule

Shape = tuple[int, ...]
# Elements of one factor: an embedding's A for a 256k vocabulary at rank 1,024 is 2^28; a header declaring more
# (a sparse file's hole, say) would make every command that reads the data allocate gigabytes for nothing.
MAX_FACTOR_ELEMENTS = 2**30


def module_info(
    module: str,
    keys: dict[str, str],
    entries: dict[str, tuple[str, Shape]],
    scale_of: Callable[[int], tuple[float, float | None, ScaleRule]],
    findings: list[Finding],
    kind: ModuleKind | None = None,
) -> ModuleInfo | None:
    """Check one module's A/B (canonical shapes) and describe it; problems become findings.

    Args:
        keys: role ("A", "B", "magnitude", "bias") → tensor key.
        entries: tensor key → (dtype code, canonical shape), i.e. after any transpose the format needs.
        scale_of: rank → (scale, alpha as written, scale rule).
        kind: "embedding" when the format says so; otherwise conv for 4-D factors, else linear.
    """
    for role, other in (("A", "B"), ("B", "A")):
        if role in keys and other not in keys:
            findings.append(
                error("missing-b" if other == "B" else "missing-a", f"{role} factor without its {other} factor", module)
            )
            return None
    if "A" not in keys:
        findings.append(error("missing-a", "DoRA magnitude or bias without LoRA factors", module))
        return None
    shapes = {role: entries[k][1] for role, k in keys.items()}
    a, b = shapes["A"], shapes["B"]
    if len(a) < 2 or len(b) < 2 or a[0] != b[1] or a[0] == 0:
        findings.append(error("rank-mismatch", f"A is {list(a)} but B is {list(b)}: ranks differ", module))
        return None
    huge = [role for role in ("A", "B") if math.prod(shapes[role]) > MAX_FACTOR_ELEMENTS]
    if huge:
        what = (
            f"{huge[0]} is {list(shapes[huge[0]])}: more than {MAX_FACTOR_ELEMENTS:,} elements, no LoRA factor's size"
        )
        findings.append(error("factor-size", what, module))
        return None
    for role in ("magnitude", "bias"):  # PEFT's conv DoRA magnitude is (1, out, 1, 1): one value per output
        if role in shapes and (
            math.prod(shapes[role]) != b[0] or sorted(shapes[role])[:-1] != [1] * (len(shapes[role]) - 1)
        ):
            findings.append(
                error(
                    "magnitude-shape" if role == "magnitude" else "bias-shape",
                    f"{role} is {list(shapes[role])}, expected [{b[0]}]",
                    module,
                )
            )
            return None
    scale, alpha, rule = scale_of(a[0])
    return ModuleInfo(
        kind=kind or ("conv" if len(a) > 2 else "linear"),
        rank=a[0],
        in_features=a[1],
        out_features=b[0],
        scale=scale,
        alpha=alpha,
        scale_rule=rule,
        fan_in_fan_out=False,
        keys=keys,
        shapes=shapes,
        dtypes={role: entries[k][0] for role, k in keys.items()},
    )


def recorded_layout(modules: dict[str, ModuleInfo], record: lineage.Record | None) -> dict[str, ModuleInfo]:
    """The Conv1D flag (`fan_in_fan_out`) loractl recorded for formats that have no field for it (kohya, GGUF)."""
    if record is None or not record.fan_in_fan_out:
        return modules
    return {n: replace(m, fan_in_fan_out=record.fan_in_fan_out.get(n, m.fan_in_fan_out)) for n, m in modules.items()}


def exact_scales(modules: dict[str, ModuleInfo], record: lineage.Record | None) -> dict[str, ModuleInfo]:
    """Prefer the exact scales loractl recorded where a stored alpha or scale rounded them."""
    if record is None or not record.scales:
        return modules
    out = dict(modules)
    for name, info in modules.items():
        exact = record.scales.get(name)
        if exact is not None and abs(exact - info.scale) <= 1e-6 * abs(info.scale):
            out[name] = replace(info, scale=exact)
    return out


def no_weights_in(directory: Path, name: str) -> FormatError:
    """A directory given to a single-file format without its default file name: the hint lists what it holds."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    shown = ", ".join(files[:5]) + (", …" if len(files) > 5 else "")
    return FormatError(
        f"no {name} in the directory",
        path=directory,
        hint=f"give the weights file itself (the directory holds: {shown})" if files else "the directory is empty",
    )
