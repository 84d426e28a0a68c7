"""Plan a merge from headers alone: which base tensor every adapter module updates, and every mismatch.

Nothing here reads tensor data, so `--dry-run` on a 70B base answers in milliseconds, and a merge
that cannot succeed fails, listing all its problems at once, before it writes a byte.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import FormatError, ShapeMismatchError, UsageError
from ..findings import Finding, error
from ..info import AdapterInfo, ModuleInfo
from ..io.checkpoint import WEIGHT_SUFFIXES, Checkpoint
from ..io.checkpoint_writer import parse_size
from ..io.config_json import read_config
from ..io.dtypes import CONFIG_NAMES, FLOAT_CODES, parse_dtype
from .merge_shared import stored_shape
from .merge_vocab import grows, tokenizer_findings, vocab_config, vocab_findings, with_adapter_tokenizer
from .weights import check_weights

if TYPE_CHECKING:
    from ..formats.options import ReadOptions
    from .merge_placed_plan import PlacedPlan

Role = Literal["lora", "dora", "bias", "full"]
# Input embeddings an untied `lm_head` can take its starting weight from.
_EMBEDDING = re.compile(r"(^|.*\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)\.weight$")
_HEAD = re.compile(r"(^|.*\.)(lm_head|embed_out)\.weight$")


@dataclass(frozen=True)
class Update:
    """One change to one output tensor: adapter `adapter`'s `module` (or full tensor) applied as `role`."""

    adapter: int
    module: str
    role: Role


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it starts from, what it becomes, and what changes it."""

    name: str
    source: str | None  # the base tensor read; None when a full tensor from an adapter supplies it
    dtype: str
    shape: tuple[int, ...]
    updates: tuple[Update, ...] = ()

    @property
    def action(self) -> str:
        """copy (bit-exact unless --dtype), merge (low-rank updates), replace (a full tensor), untie."""
        if self.source is not None and self.source != self.name:
            return "untie"
        if any(u.role != "full" for u in self.updates):
            return "merge"
        return "replace" if self.updates else "copy"

    @property
    def nbytes(self) -> int:
        from ..io.safetensors_header import DTYPE_SIZES

        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter of the merge, described from its headers, with its weight."""

    path: Path
    weight: float
    info: AdapterInfo


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided from headers; `problems` lists every mismatch found."""

    base: Path
    adapters: tuple[AdapterPlan, ...]
    tensors: tuple[TensorPlan, ...]
    problems: tuple[Finding, ...]
    max_shard_bytes: int
    dtype: str | None
    files: tuple[Path, ...]  # non-weight files copied to the output
    skipped_files: tuple[Path, ...]  # weight-like files that are not copied (they would hold stale weights)
    config_updates: dict[str, Any] = field(default_factory=dict)
    read_options: ReadOptions | None = None  # how the adapters were read (base, pickle, alpha, scale)

    @property
    def adapter_paths(self) -> list[Path]:
        return [a.path for a in self.adapters]

    @property
    def untied(self) -> list[str]:
        return [t.name for t in self.tensors if t.action == "untie"]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def count(self, action: str) -> int:
        return sum(t.action == action for t in self.tensors)

    def check(self) -> None:
        """Raise `MergePlanError` listing every problem, if there is any."""
        if self.problems:
            raise MergePlanError(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": str(self.base),
            "adapters": [
                {"path": str(a.path), "format": a.info.format, "weight": a.weight, "modules": len(a.info.modules)}
                for a in self.adapters
            ],
            "dtype": self.dtype,
            "max_shard_bytes": self.max_shard_bytes,
            "total_bytes": self.total_bytes,
            "counts": {a: self.count(a) for a in ("merge", "replace", "untie", "copy")},
            "untied": self.untied,
            "config_updates": self.config_updates,
            "files": [p.name for p in self.files],
            "skipped_files": [p.name for p in self.skipped_files],
            "tensors": [_tensor_json(t) for t in self.tensors if t.action != "copy"],
            "problems": [
                {"code": p.code, "adapter": p.path, "module": p.module, "message": p.message} for p in self.problems
            ],
        }


class MergePlanError(ShapeMismatchError):
    """The adapters do not fit the base; carries the plan with every problem."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        lines = [f"  {p.path}: {p.render()}" if p.path else f"  {p.render()}" for p in plan.problems]
        n = len(plan.problems)
        hints = {p.hint for p in plan.problems}
        super().__init__(
            f"the merge plan has {n} problem{'s' * (n != 1)}; nothing was written:\n" + "\n".join(lines),
            hint=hints.pop() if len(hints) == 1 and None not in hints else _PLAN_HINT,
        )


_PLAN_HINT = "the adapters must be made for this base; see 'loractl merge --dry-run' and 'loractl inspect ADAPTER'"


def plan_merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
    keep_quant: bool = False,
    imatrix: str | Path | None = None,
) -> MergePlan | PlacedPlan:
    """Match every adapter module and full tensor to a base tensor, from headers only.

    The base is any kind `loractl.bases` detects: a Hugging Face checkpoint
    gives a `MergePlan`, a GGUF model or a single-file SD checkpoint a `PlacedPlan` (they are
    rewritten in their own types: `dtype` and `max_shard_size` do not apply), and so does a quantized
    checkpoint (bitsandbytes, FP8), written dequantized (in `dtype`) or, with `keep_quant` (FP8's
    default), requantized in its own scheme. `format` and
    `read_options` say how to read the adapters (`--from`, `--allow-pickle`, ...); their `base` is
    always `base`. `imatrix` is llama.cpp's importance matrix for a GGUF base (`--imatrix`: the
    IQ types that need one, and every quantized tensor it covers, are requantized with it).

    Raises `UsageError` for inconsistent arguments; adapter/base mismatches are collected in the
    plan's `problems` (call `check()` to raise them all at once).
    """
    from ..bases import detect_base

    checked = _weights(adapters, weights)
    _check_order(Path(base), adapters)
    if detect_base(base) != "safetensors":
        from ..bases.protocol import OutputChoices
        from .merge_placed_plan import plan_placed_merge

        output = OutputChoices(
            parse_dtype(dtype) if dtype is not None else None, keep_quant, _requested_size(max_shard_size)
        )
        return plan_placed_merge(base, adapters, weights=checked, format=format, read_options=read_options,
                                 output=output, imatrix=imatrix)  # fmt: skip
    if imatrix is not None:
        raise UsageError("--imatrix applies to GGUF bases (llama.cpp's importance matrix)",
                         hint="drop --imatrix for this base")  # fmt: skip
    return _plan_checkpoint_merge(Path(base), adapters, checked, dtype, max_shard_size, format, read_options)


def _plan_checkpoint_merge(
    base: Path,
    adapters: Sequence[str | Path],
    weights: list[float],
    dtype: str | None,
    max_shard_size: str | int | None,
    format: str | None,
    read_options: ReadOptions | None,
) -> MergePlan:
    """`plan_merge` for a Hugging Face checkpoint (streamed into new shards by `merge.execute_merge`)."""
    from ..formats import describe_adapter
    from ..formats.options import ReadOptions

    read_options = replace(read_options or ReadOptions(), base=base)
    code = parse_dtype(dtype) if dtype is not None else None
    with Checkpoint(base) as ckpt:
        config = _read_config(ckpt)
        planner = _Planner(ckpt, config, code)
        plans = []
        for i, (path, weight) in enumerate(zip(adapters, weights, strict=True)):
            info = describe_adapter(path, format=format, options=read_options)
            planner.add_adapter(i, info, weight)
            plans.append(AdapterPlan(Path(path), weight, info))
        tensors = planner.tensors()
        files = ckpt.other_files()
        resized = planner.resized  # new tokens: the adapters' tokenizer and vocab_size (`merge_vocab`)
        copied = with_adapter_tokenizer(files, adapters) if resized else files
        return MergePlan(
            base=base,
            adapters=tuple(plans),
            tensors=tensors,
            problems=(
                *planner.problems,
                *vocab_findings(resized, planner.vocab_tensors(), config),
                *tokenizer_findings(resized, files, adapters),
            ),
            max_shard_bytes=_shard_bytes(ckpt, max_shard_size),
            dtype=code,
            files=tuple(p for p in copied if not p.name.endswith(WEIGHT_SUFFIXES)),
            skipped_files=tuple(p for p in files if p.name.endswith(WEIGHT_SUFFIXES)),
            config_updates={
                **_config_updates(config, code, any(t.action == "untie" for t in tensors)),
                **vocab_config(resized, config),
            },
            read_options=read_options,
        )


class _Planner:
    """Collects updates per output tensor and problems, adapter by adapter."""

    def __init__(self, ckpt: Checkpoint, config: dict[str, Any] | None, dtype: str | None) -> None:
        self.ckpt, self.config, self.dtype = ckpt, config, dtype
        self.updates: dict[str, list[Update]] = {}
        self.untied: dict[str, TensorPlan] = {}  # output name → plan of a tensor the base stores tied
        self.problems: list[Finding] = []
        self.resized: dict[str, tuple[int, ...]] = {}  # embeddings and heads an adapter grows (new tokens)

    def add_adapter(self, i: int, info: AdapterInfo, weight: float) -> None:
        where = str(info.path)
        self.problems += [replace(f, path=where) for f in info.errors]
        for name, t in info.full_tensors.items():  # first: a grown embedding is what its LoRA module meets
            problem = self._full(i, name, t.shape)
            if problem is not None:
                self.problems.append(replace(problem, path=where))
        for module, m in info.modules.items():
            for f in self._module(i, module, m, weight):
                self.problems.append(replace(f, path=where))

    def vocab_tensors(self) -> dict[str, tuple[int, ...]]:
        """The base's input embeddings and heads (the tensors a grown vocabulary must grow), by name."""
        return {n: self.ckpt.info(n).shape for n in self.ckpt.names if _EMBEDDING.match(n) or _HEAD.match(n)}

    def _module(self, i: int, module: str, m: ModuleInfo, weight: float) -> list[Finding]:
        target, expected = f"{module}.weight", stored_shape(m)
        source = self._source(target, expected)
        if source is None:
            hint = " (an untied lm_head needs config.json with tie_word_embeddings)" if _HEAD.match(target) else ""
            return [error("not-in-base", f"the base has no tensor {target!r}{hint}", module)]
        actual = self.ckpt.info(source)
        if self.resized.get(target, actual.shape) != expected:
            return [error("shape-mismatch", _shape_message(m, source, actual.shape), module)]
        if actual.dtype not in FLOAT_CODES:
            return [error("base-dtype", f"base tensor {source!r} is {actual.dtype}, not floating point", module)]
        out: list[Finding] = []
        if m.dora and weight != 1.0:
            out.append(error("dora-weight", f"DoRA magnitudes cannot be weighted (weight {weight})", module))
        if m.dora and math.prod(m.shapes["magnitude"]) != m.out_features:
            out.append(error("magnitude-shape", f"DoRA magnitude is {list(m.shapes['magnitude'])}", module))
        self._add(target, source, Update(i, module, "dora" if m.dora else "lora"))
        if m.bias:
            out += self._bias(i, module, m)
        return out

    def _bias(self, i: int, module: str, m: ModuleInfo) -> list[Finding]:
        target = f"{module}.bias"
        if target not in self.ckpt:
            return [error("bias-not-in-base", f"the adapter has lora_B.bias but the base has no {target!r}", module)]
        if self.ckpt.info(target).shape != (m.out_features,):
            shape = list(self.ckpt.info(target).shape)
            return [
                error("shape-mismatch", f"lora_B.bias is [{m.out_features}] but base {target!r} is {shape}", module)
            ]
        self._add(target, target, Update(i, module, "bias"))
        return []

    def _full(self, i: int, name: str, shape: tuple[int, ...]) -> Finding | None:
        source = self._source(name, shape)
        if source is None:
            return error("not-in-base", f"full tensor {name!r} has no counterpart in the base")
        have = self.ckpt.info(source).shape
        if have != shape and not ((_EMBEDDING.match(name) or _HEAD.match(name)) and grows(shape, have)):
            return error("shape-mismatch", f"full tensor {name!r} is {list(shape)} but the base has {list(have)}")
        if have != shape:
            self.resized[name] = shape
        if any(u.role == "full" for u in self.updates.get(name, [])):
            return error("full-conflict", f"two adapters replace {name!r}")
        self._add(name, source, Update(i, name, "full"))
        return None

    def _source(self, target: str, shape: tuple[int, ...]) -> str | None:
        """The base tensor `target` starts from: itself, or the input embedding a tied head shares."""
        if target in self.ckpt:
            return target
        if not (_HEAD.match(target) and self._tied()):
            return None
        found = [n for n in self.ckpt.names if _EMBEDDING.match(n) and _as_or_grown(shape, self.ckpt.info(n).shape)]
        return found[0] if len(found) == 1 else None

    def _tied(self) -> bool:
        # transformers' default for a config without the key is tied; no config.json: trust the missing head
        return self.config is None or bool(self.config.get("tie_word_embeddings", True))

    def _add(self, target: str, source: str, update: Update) -> None:
        self.updates.setdefault(target, []).append(update)
        if target not in self.ckpt and target not in self.untied:
            info = self.ckpt.info(source)
            shape = self.resized.get(target, info.shape)
            self.untied[target] = TensorPlan(target, source, self._out_dtype(info.dtype), shape)

    def _out_dtype(self, dtype: str) -> str:
        return self.dtype if self.dtype and dtype in FLOAT_CODES else dtype

    def tensors(self) -> tuple[TensorPlan, ...]:
        """Base tensors in base order, then untied heads; full replacements first in each update list."""
        out = []
        for name in [*self.ckpt.names, *sorted(self.untied)]:
            info = self.ckpt.info(name) if name in self.ckpt else None
            plan = (
                self.untied[name]
                if info is None
                else TensorPlan(name, name, self._out_dtype(info.dtype), self.resized.get(name, info.shape))
            )
            ups = sorted(self.updates.get(name, []), key=lambda u: u.role != "full")
            out.append(replace(plan, updates=tuple(ups)))
        return tuple(out)


def _as_or_grown(shape: tuple[int, ...], base: tuple[int, ...]) -> bool:
    return shape == base or grows(shape, base)


def _shape_message(m: ModuleInfo, source: str, actual: tuple[int, ...]) -> str:
    layout = " (fan_in_fan_out: stored as in × out)" if m.fan_in_fan_out else ""
    made = (
        f"{m.structure.describe()}" if m.structure else f"adapter A {tuple(m.shapes['A'])} and B {tuple(m.shapes['B'])}"
    )
    return f"{made} make{'s' * bool(m.structure)} a {m.kind} ΔW of {stored_shape(m)}{layout}, but base {source!r} is {actual}"


def _tensor_json(t: TensorPlan) -> dict[str, Any]:
    updates = [{"adapter": u.adapter, "module": u.module, "role": u.role} for u in t.updates]
    return {
        "name": t.name,
        "action": t.action,
        "source": t.source,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "updates": updates,
    }


def _check_order(base: Path, adapters: Sequence[str | Path]) -> None:
    """BASE that is an adapter and an ADAPTER that is a model: the arguments were given the wrong way round."""
    from ..formats import FORMATS

    def is_adapter(path: Path) -> bool:
        return path.exists() and any(module.detect(path) for module in FORMATS.values())

    def is_model(path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and not is_adapter(path)

    if is_adapter(base) and any(is_model(Path(a)) for a in adapters):
        model = next(str(a) for a in adapters if is_model(Path(a)))
        raise UsageError(
            f"the base {base} is an adapter and {model} is a model: did you swap BASE and ADAPTER?",
            hint=f"the base comes first: loractl merge {model} {base} -o OUTPUT",
        )


def _weights(adapters: Sequence[str | Path], weights: Sequence[float] | None) -> list[float]:
    if not adapters:
        raise UsageError("no adapter to merge", hint="give at least one ADAPTER after BASE")
    return check_weights(weights or None, len(adapters))


def _requested_size(max_shard_size: str | int | None) -> int | None:
    if max_shard_size is None:
        return None
    return parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)


def _shard_bytes(ckpt: Checkpoint, max_shard_size: str | int | None) -> int:
    """The requested limit, or the base's largest shard (so the output shards like the input)."""
    requested = _requested_size(max_shard_size)
    if requested is not None:
        return requested
    sizes = [sum(t.nbytes for t in h.tensors.values()) for h in ckpt.headers.values()]
    return max([*sizes, 1])


def _read_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    if not ckpt.path.is_dir():
        return None
    try:
        return read_config(ckpt.path)
    except FormatError:
        return None  # copied as it is; nothing to learn from it


def _config_updates(config: dict[str, Any] | None, dtype: str | None, untie: bool) -> dict[str, Any]:
    """Keys of config.json the merge changes: tie_word_embeddings when a head is untied, the dtype."""
    if config is None:
        return {}
    out: dict[str, Any] = {}
    if untie:
        out["tie_word_embeddings"] = False
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config and config[key] != CONFIG_NAMES[dtype]:
                out[key] = CONFIG_NAMES[dtype]
    return out
