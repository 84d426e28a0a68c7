"""`inspect`: what an adapter is, from headers alone or (with stats) from its data.

Without stats nothing imports torch: the header and config carry every reported field,
and the content hash shown is the one loractl recorded when it wrote the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import describe_adapter
from .formats.options import ReadOptions
from .info import AdapterInfo
from .patterns import summarize


@dataclass(frozen=True)
class ModuleStats:
    """Data-derived figures of one module (float64)."""

    delta_norm: float  # ‖scale·B·A‖_F
    nonfinite: int  # NaN/Inf values across the module's tensors


@dataclass(frozen=True)
class PatternRow:
    """Modules sharing a path pattern, rank and scale."""

    pattern: str
    rank: int
    alpha: float | None
    scale: float
    count: int


@dataclass(frozen=True)
class StructureRow:
    """LyCORIS LoHa/LoKr modules sharing a path pattern and a structure (`Structure.describe`)."""

    pattern: str
    structure: str
    rank: int  # the rank of the exact LoRA loractl reads it as
    count: int


@dataclass(frozen=True)
class Inspection:
    """The report of `inspect_adapter`."""

    info: AdapterInfo
    patterns: list[PatternRow]
    recorded_hash: str | None
    computed_hash: str | None = None
    stats: dict[str, ModuleStats] | None = None
    full_nonfinite: int = 0
    origin: dict[str, Any] | None = None  # where `pull` got it from (remote, resolved commit, content hash)
    structures: tuple[StructureRow, ...] = ()  # LyCORIS LoHa/LoKr modules

    @property
    def architecture(self) -> dict[str, Any] | None:
        """The diffusion transformer the adapter is for (`formats.architecture`), from its module names."""
        from .formats import architecture

        modules = {n: m.in_features for n, m in self.info.modules.items()}
        return architecture(modules, kohya=self.info.format == "kohya")

    @property
    def failed(self) -> bool:
        """Whether a finding is an error (the CLI then exits 1)."""
        return any(f.severity == "error" for f in self.info.findings)

    @property
    def hash_ok(self) -> bool | None:
        """None when there is nothing to compare."""
        if self.computed_hash is None or self.recorded_hash is None:
            return None
        return self.computed_hash == self.recorded_hash

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (the `--json` output)."""
        info = self.info
        doc: dict[str, Any] = {
            "path": str(info.path),
            "format": info.format,
            "base_model": info.base_model,
            "base_revision": info.base_revision,
            "task_type": info.task_type,
            "architecture": self.architecture,
            "modules": len(info.modules),
            "ranks": sorted({m.rank for m in info.modules.values()}),
            "patterns": [vars(p) for p in self.patterns],
            "rslora": any(m.scale_rule == "alpha/sqrt(r)" for m in info.modules.values()),
            "dora": any(m.dora for m in info.modules.values()),
            "lora_bias": any(m.bias for m in info.modules.values()),
            "fan_in_fan_out": any(m.fan_in_fan_out for m in info.modules.values()),
            "kinds": sorted({m.kind for m in info.modules.values()}),
            "algorithms": sorted({m.structure.algo if m.structure else "LoRA" for m in info.modules.values()}),
            "lycoris": {
                name: m.structure.to_dict() | {"exact_rank": m.rank}
                for name, m in info.modules.items()
                if m.structure is not None
            },
            "lycoris_patterns": [vars(r) for r in self.structures],
            "target_modules": sorted({_leaf(name) for name in info.modules}),
            "full_tensors": {k: list(t.shape) for k, t in info.full_tensors.items()},
            "parameters": info.num_parameters,
            "dtypes": info.dtypes,
            "file_size": info.file_size,
            "content_hash": {"recorded": self.recorded_hash, "computed": self.computed_hash, "ok": self.hash_ok},
            "base_fingerprint": info.record.base_fingerprint if info.record else None,
            "lineage": list(info.record.lineage) if info.record else [],
            "findings": [vars(f) for f in info.findings],
            "origin": self.origin,
        }
        if self.stats is not None:
            doc["stats"] = {k: vars(v) for k, v in self.stats.items()}
            doc["full_tensors_nonfinite"] = self.full_nonfinite
        return doc


def inspect_adapter(
    path: str | Path,
    *,
    stats: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    options: ReadOptions | None = None,
) -> Inspection:
    """Describe an adapter; with `stats`, also read its data for ‖ΔW‖, NaN/Inf counts and the content hash.

    `options` carries what some formats need to be read (`--base`, `--alpha`, `--scale`).
    """
    info = describe_adapter(path, format=format, allow_pickle=allow_pickle, options=options)
    attrs = {name: (m.rank, m.alpha, m.scale) for name, m in info.modules.items()}
    rows = [PatternRow(p, *a, n) for p, a, n in summarize(attrs)]
    shaped = {name: (m.structure.describe(), m.rank) for name, m in info.modules.items() if m.structure is not None}
    structures = tuple(StructureRow(p, *a, n) for p, a, n in summarize(shaped))
    recorded = info.record.content_hash if info.record else None
    from .origin import read_origin

    origin = read_origin(info.path)
    if not stats:
        return Inspection(info, rows, recorded, origin=origin, structures=structures)
    from .formats import load_adapter
    from .stats import full_nonfinite, module_stats

    adapter = load_adapter(path, format=format, allow_pickle=allow_pickle, options=options)
    per_module = {name: ModuleStats(*module_stats(m)) for name, m in adapter.modules.items()}
    computed = adapter.content_hash()
    return Inspection(info, rows, recorded, computed, per_module, full_nonfinite(adapter), origin, structures)


def _leaf(module: str) -> str:
    """The module's last named part: `q_proj`, or `to_out` for `...to_out.0`."""
    return next((p for p in reversed(module.split(".")) if not p.isdigit()), module)


def architecture_line(arch: dict[str, Any]) -> str:
    """`Flux.1 transformer, original names (kohya, ComfyUI): 19 double blocks, 38 single blocks; text encoders: …`."""
    names = {"original": "original names (kohya, ComfyUI)", "diffusers": "diffusers names"}.get(
        arch["layout"], "diffusers' names (the original ones)"
    )
    parts = [f"{n} {what}" for what, n in arch["blocks"].items()]
    if arch["outside_blocks"]:
        parts.append(f"{len(arch['outside_blocks'])} outside the blocks")
    name = " or ".join([arch["name"], *arch.get("alike", [])])  # named alike: nothing tells them apart
    line = f"{name} transformer, {names}: {', '.join(parts) or 'no block'}"
    encoders = ", ".join(f"{what} ({component})" for component, what in arch["text_encoders"].items())
    return line + (f"; text encoders: {encoders}" if encoders else "")
