"""Extract a LoRA adapter from a fine-tuned checkpoint: truncated SVD of ΔW = W_ft − W0.

Both checkpoints are read through `bases` (a Hugging Face checkpoint, a GGUF model, in any
mix; or two single-file SD checkpoints, in diffusers' names). Plan from headers (`extract_plan`;
`extract_sd` for single files, which chooses other targets), then stream, whatever the kind: one pair of tensors in memory at a time, read once, factored (`linalg`), hashed for
the fingerprints in the same pass unless `io.fingerprint_cache` remembers them for this very pair
of files. Everything that is not factored is listed in the report, so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from ..adapter import Adapter, AdapterMeta, LoraModule
from ..bases import detect_base, open_base
from ..bases.dit import paired
from ..bases.sd_single_file import SdWeights
from ..errors import LoractlError, NumericError, ShapeMismatchError
from ..io import fingerprint_cache
from ..io.atomic import check_output
from ..io.checkpoint import VIEW_DTYPES, FingerprintViews, feed_fingerprint, touched_weight_names
from ..io.tensor_bytes import dtype_code, tensor_to_bytes
from ..lineage import new_entry
from . import linalg
from .budget import allocate
from .extract_factor import ExtractConfig, Extraction, Observe, Track, build_module, cut_factors, factor
from .extract_plan import ExtractPlan, PlanEntry, check_order, plan_extract
from .extract_report import ExtractedModule, ExtractReport, TensorNote
from .extract_sd import plan_sd_extract

__all__ = ["ExtractConfig", "Extraction", "Observe", "Track", "dry_run", "extract", "extract_adapter"]

if TYPE_CHECKING:
    from ..bases.protocol import Weights
    from .budget import Allocation

T = TypeVar("T")
BUDGET_HEADROOM = 4  # without --max-rank, a budgeted module may reach this many times the uniform rank


def extract(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    config: ExtractConfig,
    *,
    format: str = "peft",
    force: bool = False,
    track: Track | None = None,
    observe: Observe | None = None,
    device: str = "cpu",
) -> ExtractReport:
    """Extract an adapter (`extract_adapter`) and write it to `output` atomically; nothing is written on any error.

    `device` (cpu, cuda, mps, auto) runs each truncated SVD there; reading and the reported figures stay
    on the CPU.
    """
    from ..formats import check_format, save_adapter

    check_output(output, [base, finetuned], force=force)
    check_format(format)
    result = extract_adapter(base, finetuned, config, track=track, observe=observe, device=device)
    if not result.adapter.modules and not result.adapter.full_tensors:
        raise LoractlError(
            "nothing to extract: no targeted weight differs between the checkpoints",
            hint="check the paths and --targets; --dry-run lists what each tensor would become",
        )
    save_adapter(result.adapter, output, format=format, force=force)
    return result.report


def dry_run(base: str | Path, finetuned: str | Path, config: ExtractConfig) -> ExtractPlan:
    """The plan alone, from headers (no tensor data is read)."""
    config.check()
    with _opened(base, finetuned) as (b, f):
        return _plan(b, f, config)


def _plan(b: Weights, f: Weights, config: ExtractConfig) -> ExtractPlan:
    if isinstance(b, SdWeights) and isinstance(f, SdWeights):
        return plan_sd_extract(b, f, config)
    return plan_extract(b, f, targets=config.targets, save_full=config.save_full, rank=config.rank)


@contextmanager
def _opened(base: str | Path, finetuned: str | Path) -> Iterator[tuple[Weights, Weights]]:
    """Both checkpoints as Hugging Face-named tensors (`bases.protocol.Weights`), closed on leaving; a
    single-file SD checkpoint pairs only with another (its names are diffusers')."""
    kinds = [detect_base(p) for p in (base, finetuned)]
    if kinds.count("sd") == 1:
        raise ShapeMismatchError(
            f"{base} is a {kinds[0]} checkpoint but {finetuned} is a {kinds[1]} one: "
            "a single-file Stable Diffusion checkpoint pairs only with another",
            hint="give two single-file SD checkpoints, or two Hugging Face / GGUF checkpoints (--dry-run shows the plan)",
        )
    with closing(open_base(base)) as b, closing(open_base(finetuned)) as f:
        if "dit" in kinds:  # diffusion transformers pair in diffusers' terms, in either layout
            yield paired(b.weights(), f.weights())
        else:
            yield b.weights(), f.weights()


def extract_adapter(
    base: str | Path,
    finetuned: str | Path,
    config: ExtractConfig,
    *,
    track: Track | None = None,
    observe: Observe | None = None,
    device: str = "cpu",
) -> Extraction:
    """The adapter and its report, in memory (the factors are small; the checkpoints are streamed).

    `observe` sees each ΔW matrix before it is factored (the only moment it exists), read-only.
    """
    from .devices import resolve_device

    config.check()
    where = resolve_device(device)
    with _opened(base, finetuned) as (b, f):
        plan = _plan(b, f, config)
        check_order(b, f)
        key = _fingerprints_key(b, f, plan)
        known = _remembered(key)
        run = _Pass(b, f, config, observe, where, hashing=known is None)
        if config.budget is not None:
            run.cap = _budget_cap(plan, config)
        entries = (track or (lambda items, _: items))(plan.entries, len(plan.entries))
        with ReadAhead(entries, run.prepare) as ahead:
            for entry, prepared in ahead:
                run.step(entry, prepared)
        chosen = run.spend(config.budget) if config.budget is not None else None
        digests = known or run.digests()
        if known is None:
            fingerprint_cache.remember(key, digests)
        report = ExtractReport(tuple(run.reports), tuple(run.notes), plan.warnings, chosen)
        params = {
            **config.params(),
            "base": _identity(b, digests["base"]),
            "finetuned": _identity(f, digests["finetuned"]),
        }
        meta = _meta(base, b, run.modules, digests)
    adapter = Adapter(modules=run.modules, full_tensors=run.full, meta=meta)
    return Extraction(adapter.with_lineage(new_entry("extract", params, [], report.to_dict())), report)


def _meta(path: str | Path, b: Weights, modules: Iterable[str], digests: dict[str, str]) -> AdapterMeta:
    """The adapter's base: its path, fingerprint and views, task type. A base whose weights under the
    modules are quantized records no fingerprint (merge takes none of a quantized GGUF either)."""
    exact = not b.quantized.intersection(touched_weight_names(modules, b))
    return AdapterMeta(
        base_model=str(path),
        base_fingerprint=digests["touched"] if exact else None,
        base_views={code: digests[code] for code in VIEW_DTYPES} if exact else {},
        task_type=_task_type(b),
    )


def _fingerprints_key(b: Weights, f: Weights, plan: ExtractPlan) -> str | None:
    """The fingerprint cache's key for this pair's fingerprints: both sides' files as they are now, in
    their roles, and what the plan does with each tensor (which weights the base fingerprint may cover)."""
    roles = [f"{role}={w.path.resolve()}" for role, w in (("base", b), ("finetuned", f))]
    return fingerprint_cache.identity(
        "extract", [*b.files, *f.files], roles + [f"{e.action}:{e.name}" for e in plan.entries]
    )


def _remembered(key: str | None) -> dict[str, str] | None:
    found = fingerprint_cache.recall(key)
    return found if isinstance(found, dict) and set(found) >= {"base", "finetuned", "touched", *VIEW_DTYPES} else None


def _identity(w: Weights, fingerprint: str) -> dict[str, str]:
    return {"path": str(w.path), "fingerprint": fingerprint}


@dataclass
class _Prepared:
    """One entry after `_Pass.prepare`: both tensors (entries not factored), or ΔW in float32 and the two norms."""

    w0: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    delta_sq: float = 0.0
    base_sq: float = 0.0


class ReadAhead(Generic[T]):
    """Iterate `(item, prepare(item))`, preparing the next item on a worker thread while the caller works.

    Reading and hashing (which release the GIL) overlap the previous matrix's SVD, and the disk
    keeps streaming while the CPU factors. One item ahead: memory grows by one prepared entry.
    Items are prepared in order on a single thread, so hashes fed there see the plan's order.
    Leaving the `with` block (also on an error) waits for the read in flight before files close.
    """

    def __init__(self, items: Iterable[T], prepare: Callable[[T], Any]) -> None:
        self._items, self._prepare = iter(items), prepare
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-read")

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[T, Any]]:
        pending: tuple[T, Future[Any]] | None = None
        for item in self._items:
            future = self._pool.submit(self._prepare, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


class _Pass:
    """The streaming pass: what has been extracted so far, and the fingerprints being hashed (when `hashing`)."""

    def __init__(
        self, base: Weights, ft: Weights, config: ExtractConfig, observe: Observe | None, device: torch.device,
        *, hashing: bool = True,
    ) -> None:  # fmt: skip
        self.base, self.ft, self.config, self.observe, self.device = base, ft, config, observe, device
        self.hashing = hashing
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, torch.Tensor] = {}
        self.reports: list[ExtractedModule] = []
        self.notes: list[TensorNote] = []
        self.base_all, self.ft_all, self.base_touched = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        self.cap = 0  # --budget: the deepest rank any module may take
        self.pending: dict[str, tuple[linalg.Truncation, PlanEntry, float, float]] = {}  # --budget: SVDs to cut
        self.base_views = FingerprintViews()

    def prepare(self, entry: PlanEntry) -> _Prepared:
        """Everything elementwise about one entry (reading, hashing, ΔW, norms): runs on the read-ahead thread.

        The fingerprints are fed here, in plan order (one thread), as before the read-ahead existed.
        """
        w0, w1 = self._read(entry.name)
        if entry.action != "lowrank":
            return _Prepared(w0, w1)
        delta, finite = _delta(w0, w1)
        if not finite:
            _check_finite(entry.name, w0, w1)  # w1 may be ΔW itself: then it is non-finite only if W_ft was
            raise NumericError(
                f"tensor {entry.name!r}: ΔW overflows float32", hint="the checkpoints' values are out of range"
            )
        base_sq, delta_sq = linalg.frobenius_sq(w0), linalg.frobenius_sq(delta)
        if delta_sq != 0.0 and self.hashing:
            feed_fingerprint(self.base_touched, entry.name, self.base.info(entry.name), _bytes(w0))
            self.base_views.feed(entry.name, w0)
        return _Prepared(delta=delta, delta_sq=delta_sq, base_sq=base_sq)

    def step(self, entry: PlanEntry, prepared: _Prepared) -> None:
        if entry.action == "lowrank":
            self._lowrank(entry, prepared)
            return
        w0, w1 = prepared.w0, prepared.w1
        assert w0 is not None and w1 is not None
        _check_finite(entry.name, w0, w1)
        if entry.action == "full":
            self.full[entry.name] = w1
            self.notes.append(TensorNote(entry.name, "saved-full", entry.reason))
        else:
            same = w0.shape == w1.shape and _equal(w0, w1)
            self.notes.append(TensorNote(entry.name, "identical" if same else "not-extracted", entry.reason))

    def _read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tensors, hashed into the whole-checkpoint fingerprints on the way (when `hashing`)."""
        w0, w1 = self.base.get(name), self.ft.get(name)
        if not self.hashing:
            return w0, w1
        feed_fingerprint(self.base_all, name, self.base.info(name), _bytes(w0))
        feed_fingerprint(self.ft_all, name, self.ft.info(name), _bytes(w1))
        return w0, w1

    def _lowrank(self, entry: PlanEntry, prepared: _Prepared) -> None:
        """Factor one prepared ΔW; peak memory ≈ this ΔW and the sketch, plus the next entry being prepared."""
        delta, delta_sq, base_sq = prepared.delta, prepared.delta_sq, prepared.base_sq
        assert delta is not None
        if delta_sq == 0.0:
            self.notes.append(TensorNote(entry.name, "identical", "ΔW = 0"))
            return
        m = delta.T if entry.kind == "embedding" or entry.fan_in_fan_out else delta.reshape(entry.matrix_shape)
        if self.observe is not None:
            self.observe(entry.module, m)
        if self.config.budget is not None:
            t = linalg.truncated_svd(m, min(self.cap, *m.shape), total=delta_sq)
            self.pending[entry.module] = (t, entry, delta_sq, base_sq)
            return
        self.modules[entry.module], report = factor(m, entry, self.config, delta_sq, base_sq, self.device)
        self.reports.append(report)

    def spend(self, budget: int) -> Allocation:
        """--budget: choose every module's rank together, then cut each pending SVD to it.

        The error of the rank-k cut of a (randomized) SVD is ‖ΔW‖² − Σ_{i≤k} σᵢ² exactly: the
        sketch's projection and the truncation inside it are orthogonal.
        """
        spectra = {n: t.S.double().square().tolist() for n, (t, _, _, _) in self.pending.items()}
        totals = {n: delta_sq for n, (_, _, delta_sq, _) in self.pending.items()}
        costs = {n: sum(e.matrix_shape) for n, (_, e, _, _) in self.pending.items()}
        chosen = allocate(spectra, totals, costs, budget)
        for name, (t, entry, delta_sq, base_sq) in self.pending.items():
            cut = t.head(chosen.ranks[name])
            residual = max(delta_sq - cut.energy(), 0.0)
            factors = cut_factors(cut, self.config)
            self.modules[name], report = build_module(cut, factors, entry, residual, delta_sq, base_sq)
            self.reports.append(report)
        return chosen

    def digests(self) -> dict[str, str]:
        """What the pass hashed: both whole checkpoints, the base weights ΔW changes (the adapter's base
        fingerprint), and their views (`FingerprintViews`)."""
        hashed = {"base": self.base_all, "finetuned": self.ft_all, "touched": self.base_touched}
        return {k: "sha256:" + h.hexdigest() for k, h in hashed.items()} | self.base_views.digests()


def _budget_cap(plan: ExtractPlan, config: ExtractConfig) -> int:
    """How deep each module's SVD goes under --budget: --max-rank, else 4× the uniform rank the budget buys."""
    if config.max_rank is not None:
        return config.max_rank
    cost = sum(sum(e.matrix_shape) for e in plan.by_action("lowrank"))
    return BUDGET_HEADROOM * max(1, (config.budget or 0) // max(cost, 1))


def _delta(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(W_ft − W0 in float32, whether it is finite), row block by row block.

    Whole-tensor arithmetic on mixed dtypes (a bf16 W0) makes a float32 temporary as large as
    ΔW; blocks keep the temporaries small. A float32 W_ft is overwritten in place.
    """
    delta = w1 if w1.dtype == torch.float32 else torch.empty(w1.shape, dtype=torch.float32)
    d, a, b = (t.reshape(t.shape[0], -1) for t in (delta, w0, w1))
    finite = True
    for i in range(0, d.shape[0], linalg.ROW_BLOCK):
        rows = slice(i, i + linalg.ROW_BLOCK)
        torch.sub(b[rows].float(), a[rows].float(), out=d[rows])
        finite = finite and bool(torch.isfinite(d[rows]).all())
    return delta, finite


def _bytes(t: torch.Tensor) -> memoryview:
    return tensor_to_bytes(t, dtype_code(t.dtype))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical when the dtypes agree; equal values otherwise (a bf16 base, a float32 fine-tune)."""
    if a.dtype == b.dtype:
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    return bool(torch.equal(a.to(torch.float64), b.to(torch.float64)))


def _check_finite(name: str, w0: torch.Tensor, w1: torch.Tensor) -> None:
    """Raise `NumericError` naming the checkpoint that holds NaN or Inf."""
    for which, t in (("base", w0), ("fine-tuned", w1)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NumericError(
                f"tensor {name!r} holds NaN or Inf in the {which} checkpoint",
                hint="the checkpoint is damaged or diverged",
            )


def _task_type(base: Weights) -> str | None:
    """CAUSAL_LM when the base's config.json names a *ForCausalLM architecture (PEFT then builds the right wrapper)."""
    architectures = base.config().get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
