"""Extract a LoRA from two single-file Stable Diffusion checkpoints (sd-scripts' `extract_lora_from_models.py`).

The modules are the diffusers ones (`unet.down_blocks.…`, `text_encoder.text_model.…`), found in the
single files through diffusers' own conversion map (`bases/sd_single_file`), so the adapter loads
in diffusers, and in kohya format in A1111/ComfyUI. `extract.extract` and `extract.extract_adapter` come
here for a pair of single-file checkpoints; both are read through their base (`bases.sd_single_file`). OpenCLIP's fused q/k/v weight gives three
modules, each factored on its own rows. By default the linear layers and 1×1 convolutions of the
UNet and text encoders are factored, as sd-scripts does; `--targets` chooses others (3×3 convs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter, AdapterMeta, LoraModule
from ..bases import sd_single_file
from ..errors import ShapeMismatchError, UsageError
from ..lineage import new_entry
from . import linalg
from .extract_factor import ExtractConfig, Extraction, Observe, Track, factor
from .extract_plan import ExtractPlan, PlanEntry, matches
from .extract_report import ExtractedModule, ExtractReport, TensorNote

if TYPE_CHECKING:
    import torch

    from ..bases.sd_single_file import SingleFileBase, _Src
    from ..io.checkpoint import Checkpoint

_NOT_LORA = re.compile(r"(token_embedding|position_embedding|text_projection)$")


@contextmanager
def _opened(base: str | Path, finetuned: str | Path) -> Iterator[tuple[SingleFileBase, SingleFileBase]]:
    with closing(sd_single_file.open(Path(base))) as b, closing(sd_single_file.open(Path(finetuned))) as f:
        yield b, f


def plan_sd_extract(base: SingleFileBase, finetuned: SingleFileBase, config: ExtractConfig) -> ExtractPlan:
    """Entries named by diffusers module, with the stored tensor in `reason` (from headers only)."""
    if base.kind != finetuned.kind or base.shapes != finetuned.shapes:
        raise ShapeMismatchError(
            f"{base.path} and {finetuned.path} are not the same model "
            f"(layouts {sorted({base.kind, finetuned.kind})} or tensor shapes differ)",
            hint="extract from a fine-tune of this very checkpoint",
        )
    entries = []
    for key, src in sorted(base.names.items()):
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or len(src.shape) not in (2, 4) or _NOT_LORA.search(module):
            continue
        conv3 = len(src.shape) == 4 and math.prod(src.shape[2:]) > 1
        if (matches(config.targets, module) if config.targets else not conv3) and not src.transposed:
            where = src.key + (f"[{src.rows[0]}:{src.rows[1]}]" if src.rows else "")
            entries.append(PlanEntry(key, module, "lowrank", src.shape, "conv" if len(src.shape) == 4 else "linear",
                                     reason=where))  # fmt: skip
    return ExtractPlan(tuple(entries))


def dry_run_sd(base: str | Path, finetuned: str | Path, config: ExtractConfig) -> ExtractPlan:
    """The plan alone, from headers (no tensor data is read)."""
    config.check()
    with _opened(base, finetuned) as (b, f):
        return plan_sd_extract(b, f, config)


def extract_sd_adapter(
    base: str | Path, finetuned: str | Path, config: ExtractConfig, *, track: Track | None = None,
    observe: Observe | None = None, device: str = "cpu",
) -> Extraction:  # fmt: skip
    """The adapter and its report; one stored tensor pair in memory at a time (each SVD on `device`)."""
    from .devices import resolve_device

    config.check()
    if config.budget is not None:
        raise UsageError("--budget is not supported for single-file SD checkpoints yet", hint="use --rank or --energy")
    with _opened(base, finetuned) as (b, f):
        plan = plan_sd_extract(b, f, config)
        sources = b.names
        entries: Iterable[PlanEntry] = (track or (lambda items, _: items))(plan.entries, len(plan.entries))
        modules, reports, notes = _factor_all(b.ckpt, f.ckpt, entries, sources, config, observe, resolve_device(device))
        notes += _unextracted(b.ckpt, f.ckpt, {sources[e.name].key for e in plan.entries})
    report = ExtractReport(tuple(reports), tuple(notes))
    params = {**config.params(), "base": str(base), "finetuned": str(finetuned)}
    adapter = Adapter(modules=modules, meta=AdapterMeta(base_model=str(base)))
    return Extraction(adapter.with_lineage(new_entry("extract", params, [], report.to_dict())), report)


def _factor_all(
    b: Checkpoint, f: Checkpoint, entries: Iterable[PlanEntry], sources: dict[str, _Src],
    config: ExtractConfig, observe: Observe | None, device: torch.device,
) -> tuple[dict[str, LoraModule], list[ExtractedModule], list[TensorNote]]:  # fmt: skip
    modules: dict[str, LoraModule] = {}
    reports: list[ExtractedModule] = []
    notes: list[TensorNote] = []
    for entry in entries:
        w0, w1 = (_rows(c.get(sources[entry.name].key), sources[entry.name].rows) for c in (b, f))
        delta = w1.float() - w0.float()
        delta_sq = linalg.frobenius_sq(delta)
        if delta_sq == 0.0:
            notes.append(TensorNote(entry.name, "identical", "ΔW = 0"))
            continue
        m = delta.reshape(entry.matrix_shape)
        if observe is not None:
            observe(entry.module, m)
        module, report = factor(m, entry, config, delta_sq, linalg.frobenius_sq(w0.float()), device)
        modules[entry.module] = module
        reports.append(replace(report, shape=entry.shape))
    return modules, reports, notes


def _rows(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return t if rows is None else t[rows[0] : rows[1]]


def _unextracted(b: Checkpoint, f: Checkpoint, factored: set[str]) -> list[TensorNote]:
    """Stored tensors that were not factored but changed: the adapter does not reproduce them."""
    import torch

    notes = []
    for name in b.names:
        if name not in factored and not torch.equal(b.get(name), f.get(name)):
            notes.append(TensorNote(name, "not-extracted", "not a LoRA target (norm, bias, embedding, VAE, 3×3 conv)"))
    return notes
