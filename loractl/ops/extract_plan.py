"""What an extraction does with each tensor, decided from the two checkpoints' headers alone.

Every tensor name gets one action: `lowrank` (a 2-D linear weight or a conv kernel, to be
factored), `full` (kept whole because `--save-full` names its module) or `compare` (not
representable as LoRA: it is read only to learn whether it changed, so the report can say
what the adapter does not reproduce). Mismatches that make the pair meaningless — a
tensor missing from one side, a shape that differs outside a vocabulary, a rank larger
than a matrix — are raised here, before any tensor data is read. `check_order` catches a
swapped pair (BASE a loractl merge into FINETUNED, whatever the kind of checkpoint), hashing the
weights that merge changed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ShapeMismatchError, UsageError
from ..info import ModuleKind
from ..io.checkpoint import scheme_of, touched_weight_names
from ..io.dtypes import FLOAT_CODES

if TYPE_CHECKING:
    from ..bases.protocol import Weights

Action = Literal["lowrank", "full", "compare"]

# transformers' GPT-2 family stores these linear layers as Conv1D weights, (in, out).
CONV1D_MODELS = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_LEAVES = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)$")
# Module names of input embeddings (LoRA kind "embedding") and output heads (plain linear).
EMBEDDINGS = re.compile(
    r"(^|.*\.)(embed_tokens|embed_in|embed_positions|wte|wpe|word_embeddings|tok_embeddings|shared)$"
)
HEADS = re.compile(r"(^|.*\.)(lm_head|embed_out)$")


@dataclass(frozen=True)
class PlanEntry:
    """One tensor name present in both checkpoints, and what to do with it."""

    name: str
    module: str
    action: Action
    shape: tuple[int, ...]
    kind: ModuleKind = "linear"  # for `lowrank`: how the factors are laid out
    fan_in_fan_out: bool = False  # a GPT-2 Conv1D weight, stored (in, out)
    reason: str = ""  # for `compare` and `full`: why the tensor is not factored

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(d, k) of the matrix that is factored: conv kernels flattened, embeddings transposed."""
        if self.kind == "embedding" or self.fan_in_fan_out:
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape[1:])


@dataclass(frozen=True)
class ExtractPlan:
    """Entries sorted by tensor name (the order fingerprints are taken in), plus notes."""

    entries: tuple[PlanEntry, ...]
    warnings: tuple[str, ...] = ()

    def by_action(self, action: Action) -> list[PlanEntry]:
        return [e for e in self.entries if e.action == action]

    def to_dict(self) -> dict[str, Any]:
        rows = [
            {"name": e.name, "action": e.action, "kind": e.kind, "shape": list(e.shape), "reason": e.reason}
            for e in self.entries
        ]
        return {"entries": rows, "warnings": list(self.warnings)}


def _is_conv1d(e: PlanEntry) -> bool:
    return e.action == "lowrank" and e.kind == "linear" and bool(CONV1D_LEAVES.search(e.module))


def matches(patterns: Sequence[str], module: str) -> bool:
    """PEFT's rule for target names: a pattern matches the whole module path or a dotted suffix of it."""
    return any(re.fullmatch(rf"(.*\.)?(?:{p})", module) for p in patterns)


def plan_extract(
    base: Weights,
    finetuned: Weights,
    *,
    targets: Sequence[str] = (),
    save_full: Sequence[str] = (),
    rank: int | None = None,
) -> ExtractPlan:
    """Pair the checkpoints' tensors by name and classify each pair.

    Raises:
        ShapeMismatchError: a tensor is missing on one side, or shapes or dtype families differ.
        UsageError: a pattern is not a valid regex or matches nothing, or `rank` exceeds a matrix.
    """
    for pattern in (*targets, *save_full):
        _check_regex(pattern)
    _check_names(base, finetuned)
    entries, warnings = [], []
    for name in sorted(base.names):
        entry = _classify(base, finetuned, name, targets, save_full)
        entries.append(entry)
        b, f = base.info(name).dtype, finetuned.info(name).dtype
        if b != f:
            warnings.append(f"{name}: base is {b}, fine-tuned is {f}; ΔW is computed in float32")
    if base.config().get("model_type") in CONV1D_MODELS:
        entries = [replace(e, fan_in_fan_out=True) if _is_conv1d(e) else e for e in entries]
    _check_patterns(entries, targets, save_full)
    if rank is not None:
        _check_rank(entries, rank)
    return ExtractPlan(tuple(entries), tuple(warnings))


def check_order(base: Weights, finetuned: Weights) -> None:
    """Refuse BASE and FINETUNED given the wrong way round: BASE is a loractl merge into FINETUNED.

    A merge's record holds, per adapter, the fingerprint of the base weights it changed (as `merge`
    checks an adapter's base): FINETUNED's weights hashing to it are that base, so the pair is swapped.
    """
    for fingerprint, modules in _merged_into(base):
        names = touched_weight_names(modules, finetuned)
        if names and finetuned.fingerprint(names, scheme=scheme_of(fingerprint)) == fingerprint:
            raise UsageError(
                f"{base.path} is a merge into {finetuned.path} (its loractl merge record says so): "
                "did you swap BASE and FINETUNED?",
                hint=f"the base comes first: loractl extract {finetuned.path} {base.path} -o OUTPUT",
            )


def _merged_into(ckpt: Weights) -> list[tuple[str, list[str]]]:
    """(base fingerprint, modules) per adapter of the merge that wrote `ckpt`; none for other checkpoints."""
    doc = ckpt.merge_record()
    if doc is None:
        return []
    try:
        return [
            (str(a["base_fingerprint"]), [str(m["module"]) for m in doc["modules"] if m["adapter"] == i])
            for i, a in enumerate(doc["adapters"])
            if a["base_fingerprint"]
        ]
    except (LookupError, TypeError):
        return []  # a damaged record is no evidence either way


def _classify(base: Weights, ft: Weights, name: str, targets: Sequence[str], save_full: Sequence[str]) -> PlanEntry:
    b, f = base.info(name), ft.info(name)
    module, _, leaf = name.rpartition(".")
    vocab = bool(EMBEDDINGS.match(module) or HEADS.match(module))
    if (b.dtype in FLOAT_CODES) != (f.dtype in FLOAT_CODES):
        raise ShapeMismatchError(f"tensor {name!r} is {b.dtype} in the base but {f.dtype} in the fine-tuned checkpoint")
    if b.shape != f.shape:
        if not (vocab and len(b.shape) == len(f.shape) and b.shape[1:] == f.shape[1:]):
            raise ShapeMismatchError(
                f"tensor {name!r} is {list(b.shape)} in the base but {list(f.shape)} in the fine-tuned checkpoint",
                hint="extract needs two checkpoints of the same architecture; compare them with 'loractl inspect'",
            )
        if save_full and matches(save_full, module):
            raise UsageError(
                f"cannot keep {name!r} as a full tensor: its vocabulary was resized ({b.shape[0]} → {f.shape[0]} rows)",
                hint="PEFT loads full tensors onto the base's module; resize the base's vocabulary first",
            )
        return PlanEntry(
            name, module, "compare", f.shape, reason=f"resized vocabulary ({b.shape[0]} → {f.shape[0]} rows)"
        )
    if save_full and matches(save_full, module):
        return PlanEntry(name, module, "full", f.shape, reason="--save-full")
    return _lowrank_or_compare(name, module, leaf, f.shape, f.dtype, vocab, targets)


def _lowrank_or_compare(
    name: str, module: str, leaf: str, shape: tuple[int, ...], dtype: str, vocab: bool, targets: Sequence[str]
) -> PlanEntry:
    if dtype not in FLOAT_CODES:
        return PlanEntry(name, module, "compare", shape, reason=f"{dtype} tensor")
    if leaf != "weight" or len(shape) < 2 or len(shape) > 5:
        what = "1-D tensor (norm or bias)" if len(shape) <= 1 else f"{len(shape)}-D tensor that is not a module weight"
        return PlanEntry(name, module, "compare", shape, reason=what)
    targeted = matches(targets, module) if targets else not vocab
    if not targeted:
        why = "embedding or output head (name it in --targets or --save-full)" if vocab else "not matched by --targets"
        return PlanEntry(name, module, "compare", shape, reason=why)
    kind: ModuleKind = "embedding" if EMBEDDINGS.match(module) else ("conv" if len(shape) > 2 else "linear")
    return PlanEntry(name, module, "lowrank", shape, kind=kind)


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise UsageError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None


def _check_names(base: Weights, ft: Weights) -> None:
    for missing, here, there in ((set(base.names) - set(ft.names), "base", "fine-tuned"),
                                 (set(ft.names) - set(base.names), "fine-tuned", "base")):  # fmt: skip
        if missing:
            first = sorted(missing)[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ShapeMismatchError(
                f"tensor {first!r}{more} is in the {here} checkpoint but not in the {there} one",
                hint="extract needs two checkpoints of the same architecture; compare them with 'loractl inspect'",
            )


def _check_patterns(entries: list[PlanEntry], targets: Sequence[str], save_full: Sequence[str]) -> None:
    modules = {e.module for e in entries}
    for option, patterns in (("--targets", targets), ("--save-full", save_full)):
        for p in patterns:
            if not any(matches([p], m) for m in modules):
                raise UsageError(
                    f"{option} {p!r} matches no module",
                    hint="patterns match module paths or their dotted suffixes, e.g. 'q_proj' or 'layers\\.0\\..*'",
                )


def _check_rank(entries: list[PlanEntry], rank: int) -> None:
    if rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    for e in entries:
        if e.action == "lowrank" and rank > min(e.matrix_shape):
            raise UsageError(
                f"--rank {rank} exceeds module {e.module!r}, whose {list(e.shape)} weight has rank at most {min(e.matrix_shape)}",
                hint="choose a smaller --rank, narrow --targets, or use --energy with --max-rank",
            )
