"""Combine adapters: exact sums on factors (cat, svd), PEFT's linear mix, and TIES / DARE.

Module by module, with weights wᵢ and each adapter's own scale sᵢ folded in:
    cat     B = [B₁ … Bₙ], A = [w₁s₁A₁; …; wₙsₙAₙ]: exactly Σ wᵢ sᵢ Bᵢ Aᵢ at rank Σ rᵢ
    svd     the same sum, truncated optimally through `factored_svd` (never forms (out, in))
    linear  PEFT: A = Σ sign·√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ, equal ranks. NOT Σ wᵢ ΔWᵢ: it adds
            cross terms Bᵢ Aⱼ; kept for parity with PEFT's add_weighted_adapter("linear")
    ties, dare, dare_ties
            PEFT's ties_svd / dare_linear_svd / dare_ties_svd: trim or randomly drop entries of
            each dense ΔWᵢ, merge, then truncate with a dense SVD (these are dense by definition)
A module missing from an adapter counts as zero. Outputs have scale 1 (alpha = rank), as PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .. import lineage
from ..adapter import Adapter, AdapterMeta, LoraModule
from ..choices import COMBINE_METHODS, MAJORITY_SIGNS
from ..errors import AdapterError, ShapeMismatchError, UsageError
from . import linalg
from .algebra_result import AlgebraResult, ModuleChange
from .lowrank import (
    LowRankFit,
    RankRule,
    common_dtype,
    factored_distance,
    factored_svd,
    matrices,
    rebuild,
    to_factor_layout,
    truncate,
    truncate_dense,
)
from .weights import check_weights

METHODS = COMBINE_METHODS  # the one list lives in `loractl.choices`
LINEAR_WARNING = (
    "method 'linear' mixes A's and B's separately (PEFT's semantics): the result is not the weighted sum "
    "of the adapters' ΔW; use 'cat' (exact) or 'svd' (exact, then truncated) for that"
)


@dataclass(frozen=True)
class CombineOptions:
    """Everything besides the adapters: method, weights, rank rule, TIES/DARE parameters."""

    method: str = "svd"  # one of METHODS
    weights: tuple[float, ...] | None = None
    rule: RankRule | None = None  # svd/ties/dare; default: the largest input rank per module (as PEFT)
    density: float | None = None  # ties/dare: fraction of entries kept
    seed: int = 0  # dare: the random drop
    majority_sign: str = "total"  # ties/dare_ties: "total" or "frequency"
    allow_base_mismatch: bool = False


def combine(adapters: list[Adapter], options: CombineOptions, *, device: str = "cpu") -> AlgebraResult:
    """Combine `adapters` module by module as `options.method` says (see the module docstring).

    `device` (cpu, cuda, mps, auto) runs the truncations there: the float64 factor algebra of svd
    (the CPU for mps) and the float32 SVD of the trimmed dense ΔW of ties/dare.
    """
    from .devices import resolve_device

    where = resolve_device(device)
    weights = _check(adapters, options)
    generator = torch.Generator().manual_seed(options.seed)
    modules: dict[str, LoraModule] = {}
    report = []
    for name in _module_order(adapters):
        present = [(w, a.modules[name]) for w, a in zip(weights, adapters, strict=True) if name in a.modules]
        _check_shapes(name, [m for _, m in present])
        modules[name], rep = _combine_module(name, present, options, generator, where)
        report.append(rep)
    first = adapters[0]
    meta = replace(
        first.meta,
        recorded_hash=None,
        base_model=next((a.meta.base_model for a in adapters if a.meta.base_model), None),
    )
    out = Adapter(modules=modules, meta=meta)
    result = AlgebraResult(out, tuple(report), (LINEAR_WARNING,) if options.method == "linear" else ())
    entry = lineage.new_entry(
        "combine", _params(options, weights), [a.content_hash() for a in adapters], result.metrics()
    )
    return replace(result, adapter=out.with_lineage(entry))


def _combine_module(
    name: str,
    present: list[tuple[float, LoraModule]],
    options: CombineOptions,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[LoraModule, ModuleChange]:
    like = replace(present[0][1], scale_rule="alpha/r")
    dtype = common_dtype([m for _, m in present])
    rank_in = sum(m.rank for _, m in present)
    if options.method == "cat":
        b, a = _stacked(present)
        return rebuild(like, b, a, 1.0, dtype), ModuleChange(name, rank_in, rank_in, 0.0)
    if options.method == "linear":
        b, a = _linear(name, present)
        exact_b, exact_a = _stacked(present)
        norm = linalg.factored_frobenius(exact_b, exact_a)
        gap = factored_distance(exact_b, exact_a, b, a) / norm if norm > 0 else 0.0
        return rebuild(like, b, a, 1.0, dtype), ModuleChange(name, rank_in, int(a.shape[0]), gap)
    rule = options.rule or RankRule(rank=max(m.rank for _, m in present))
    cut = _svd_cut(present, options, generator, rule, device)
    return rebuild(like, cut.B, cut.A, 1.0, dtype), ModuleChange(name, rank_in, cut.rank, cut.rel_error)


def _svd_cut(
    present: list[tuple[float, LoraModule]],
    options: CombineOptions,
    generator: torch.Generator,
    rule: RankRule,
    device: torch.device,
) -> LowRankFit:
    """The merged ΔW truncated by `rule`: factored for svd, dense for the trimming methods."""
    from .devices import float64_device

    if options.method == "svd":
        b, a = _stacked(present)
        return truncate(factored_svd([b], [a], float64_device(device)), rule)
    like = present[0][1]
    deltas = [m.delta_weight() for _, m in present]  # base layout, as PEFT's get_delta_weight
    weights = torch.tensor([w for w, _ in present], dtype=torch.float32)
    merged = _trim_and_merge(options.method, deltas, weights, options.density or 1.0, options.majority_sign, generator)
    return truncate_dense(to_factor_layout(merged, like), rule, device)


def _trim_and_merge(
    method: str,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """PEFT's ties / dare_linear / dare_ties (utils/merge_utils.py) on dense ΔW's of one shape."""
    if method == "ties":
        kept = torch.stack([_keep_largest(d, density) for d in deltas])
    else:
        kept = torch.stack([_random_drop(d, density, generator) for d in deltas])
    weighted = kept * weights.view(-1, *([1] * deltas[0].ndim))
    if method == "dare":
        return weighted.sum(0)
    agree = _majority_sign_mask(kept, majority_sign)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the int(density · numel) entries of largest magnitude."""
    if density >= 1:
        return delta
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=int(density * delta.numel())).indices] = 1
    return delta * mask.reshape(delta.shape)


def _random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide by it (unbiased in expectation)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each entry's sign agrees with the elected sign: of the summed values ('total') or signs ('frequency')."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1.0, -1.0)


def _stacked(present: list[tuple[float, LoraModule]]) -> tuple[torch.Tensor, torch.Tensor]:
    """B_cat (out, Σr) and A_cat (Σr, in) with wᵢ sᵢ folded into each Aᵢ (float64)."""
    pairs = [matrices(m) for _, m in present]
    b = torch.cat([p[0] for p in pairs], dim=1)
    a = torch.cat([w * m.scale * p[1] for (w, m), p in zip(present, pairs, strict=True)], dim=0)
    return b, a


def _linear(name: str, present: list[tuple[float, LoraModule]]) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {m.rank for _, m in present}
    if len(ranks) > 1:
        raise AdapterError(
            f"module {name!r}: method 'linear' needs equal ranks, got {sorted(ranks)}",
            hint="use --method cat (exact) or --method svd, or resize the adapters to one rank first",
        )
    b = torch.zeros_like(matrices(present[0][1])[0])
    a = torch.zeros_like(matrices(present[0][1])[1])
    for w, m in present:
        mb, ma = matrices(m)
        root = math.sqrt(abs(w * m.scale))
        b, a = b + root * mb, a + math.copysign(root, w * m.scale) * ma
    return b, a


def _check(adapters: list[Adapter], options: CombineOptions) -> list[float]:
    """Validate inputs and options before any arithmetic; the weights to use."""
    if not adapters:
        raise UsageError("no adapters to combine", hint="give one or more adapter paths")
    if options.method not in METHODS:
        raise UsageError(f"unknown method {options.method!r}", hint=f"choose one of: {', '.join(METHODS)}")
    weights = check_weights(options.weights, len(adapters))
    _check_options(options)
    _check_bases([a.meta for a in adapters], options.allow_base_mismatch)
    for a in adapters:
        a.check()
        _check_linear_in_delta(a, options.method)
    return weights


def _check_options(options: CombineOptions) -> None:
    if options.rule is not None:
        if options.method in ("cat", "linear"):
            raise UsageError(
                f"method {options.method!r} keeps the rank it gets; --rank/--energy do not apply",
                hint="use --method svd to choose the output rank",
            )
        options.rule.check()
    if options.majority_sign not in MAJORITY_SIGNS:
        raise UsageError(f"unknown majority sign method {options.majority_sign!r}", hint="choose total or frequency")
    trimming = options.method in ("ties", "dare", "dare_ties")
    if trimming and (options.density is None or not 0 < options.density <= 1):
        raise UsageError(
            f"method {options.method!r} needs --density in (0, 1], got {options.density}",
            hint="the fraction of each ΔW's entries kept, e.g. --density 0.5",
        )
    if not trimming and options.density is not None:
        raise UsageError(f"--density does not apply to method {options.method!r}", hint="use ties, dare or dare_ties")


def _check_bases(metas: list[AdapterMeta], allow_mismatch: bool) -> None:
    """Refuse different base fingerprints, or base names whose last path part differs (a Hub id and a local
    copy of it, `org/model` and `/data/model`, count as one base; shapes are checked module by module)."""
    fingerprints = {m.base_fingerprint for m in metas if m.base_fingerprint}
    if len(fingerprints) > 1:
        raise AdapterError(
            f"the adapters were made for different bases (fingerprints {', '.join(sorted(fingerprints))})",
            hint="their base weights differ; combine adapters of one base",
        )
    names = {m.base_model for m in metas if m.base_model}
    if len({n.rstrip("/").rsplit("/", 1)[-1] for n in names}) > 1 and not allow_mismatch:
        raise AdapterError(
            f"the adapters were made for different bases ({', '.join(sorted(names))})",
            hint="combine adapters of one base; pass --allow-base-mismatch if these names are one base",
        )


def _check_linear_in_delta(adapter: Adapter, method: str) -> None:
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            raise AdapterError(
                f"module {name!r} is DoRA: combining is linear in ΔW, but a DoRA update is not "
                "(it renormalizes W + ΔW column by column and rescales by its magnitude vector)",
                hint="merge DoRA adapters into the base one at a time ('loractl merge') instead",
            )
        if m.bias is not None:
            raise AdapterError(
                f"module {name!r} has a LoRA bias (lora_B.bias); {method!r} does not combine biases",
                hint="merge such adapters into the base instead",
            )
    if adapter.full_tensors:
        key = next(iter(adapter.full_tensors))
        raise AdapterError(
            f"adapter has full tensors (modules_to_save, e.g. {key!r}); those replace weights and cannot be summed",
            hint="combine adapters without modules_to_save, or merge them into the base",
        )


def _check_shapes(name: str, modules: list[LoraModule]) -> None:
    first = modules[0]
    for m in modules[1:]:
        same = (m.kind, m.fan_in_fan_out, m.out_features, tuple(m.A.shape[1:])) == (
            first.kind,
            first.fan_in_fan_out,
            first.out_features,
            tuple(first.A.shape[1:]),
        )
        if not same:
            raise ShapeMismatchError(
                f"module {name!r}: ΔW shapes differ between adapters "
                f"(B {tuple(first.B.shape)} A {tuple(first.A.shape)} vs B {tuple(m.B.shape)} A {tuple(m.A.shape)})",
                hint="the adapters were made for different bases; see 'loractl inspect ADAPTER'",
            )


def _module_order(adapters: list[Adapter]) -> list[str]:
    """Modules in first-seen order across the adapters (the order random drops are drawn in)."""
    return list(dict.fromkeys(name for a in adapters for name in a.modules))


def _params(options: CombineOptions, weights: list[float]) -> dict[str, object]:
    params: dict[str, object] = {"method": options.method, "weights": weights}
    if options.rule is not None:
        params.update(options.rule.params())
    if options.method in ("ties", "dare", "dare_ties"):
        params.update(density=options.density, seed=options.seed, majority_sign=options.majority_sign)
    return params
