"""`validate`: every problem in an adapter, found in one pass, as findings with codes.

Structure comes from the header and config (no torch); data checks (NaN/Inf, the content
hash) read each tensor once; `base` checks targets and shapes against a base checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoractlError
from .findings import Finding, error, warning
from .formats import describe_adapter
from .formats.options import ReadOptions
from .info import AdapterInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from .ops.merge_io import ReusingReader

SCAN_BYTES = 64 << 20  # rows read at once when scanning for NaN/Inf


@dataclass(frozen=True)
class ValidationReport:
    """Findings for one adapter path."""

    path: str
    format: str | None
    findings: list[Finding] = field(default_factory=list)
    content_hash: str | None = None
    summary: list[str] = field(default_factory=list)  # one sentence per pattern the findings make together

    def failed(self, strict: bool = False) -> bool:
        """Errors fail; warnings fail only when `strict`."""
        return any(f.severity == "error" or strict for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "content_hash": self.content_hash,
            "summary": self.summary,
            "findings": [vars(f) for f in self.findings],
        }


@dataclass(frozen=True)
class ValidationRun:
    """Several adapters validated together (`loractl validate PATHS`): `ok` unless one fails."""

    reports: list[ValidationReport]
    strict: bool = False

    @property
    def ok(self) -> bool:
        return not any(r.failed(self.strict) for r in self.reports)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "strict": self.strict, "reports": [r.to_dict() for r in self.reports]}


def validate_adapter(
    path: str | Path,
    *,
    base: str | Path | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
    options: ReadOptions | None = None,
    target: str | None = None,
) -> ValidationReport:
    """Check one adapter; unreadable files become an `unreadable` finding, never an exception.

    `base` is checked against and also helps readers that need it (kohya names, GGUF head counts);
    `target` adds what that consumer would refuse or drop (`consumer_rules`).
    """
    options = replace(options or ReadOptions(), allow_pickle=allow_pickle or bool(options and options.allow_pickle))
    if base is not None and options.base is None:
        options = replace(options, base=Path(base))
    try:
        info = describe_adapter(path, format=format, options=options)
    except LoractlError as e:
        return ValidationReport(str(path), None, [_unreadable(e)])
    findings = list(info.findings) + _shape_findings(info)
    content_hash = None
    try:
        ok = not any(f.severity == "error" for f in findings)
        data, content_hash = _data_findings(info, ok, options)
        findings += data
        if base is not None:
            findings += _base_findings(info, Path(base))
        if target is not None:
            from .consumer_rules import target_findings

            findings += target_findings(info, target, Path(base) if base is not None else None)
    except LoractlError as e:
        findings.append(_unreadable(e))
    located = [_located(f, info) for f in findings]
    return ValidationReport(str(path), info.format, located, content_hash, _summary(info, located))


def _unreadable(e: LoractlError) -> Finding:
    """The reader's refusal, with its hint (`--allow-pickle`, `--from`, ...): the hint is the way forward."""
    return replace(error("unreadable", str(e)), hint=e.hint)


def _located(f: Finding, info: AdapterInfo) -> Finding:
    return replace(f, path=str(info.files[-1]))


def _summary(info: AdapterInfo, findings: list[Finding]) -> list[str]:
    """What many findings of one code say together: an adapter none of whose modules the base has is for
    another architecture, which 36 lines of `base-missing` leave the reader to work out."""
    missing = {f.module for f in findings if f.code == "base-missing"}
    if not missing:
        return []
    total = len(info.modules)
    line = f"{len(missing)} of {total} modules have no tensor in the base"
    if len(missing) == total:
        line += ": the adapter was made for another architecture"
        line += f" ({info.base_model})" if info.base_model else ""
    return [line]


def _shape_findings(info: AdapterInfo) -> list[Finding]:
    out = []
    for name, m in info.modules.items():
        if m.kind != "conv" and m.rank > min(m.in_features, m.out_features):
            out.append(
                warning(
                    "rank-too-high", f"rank {m.rank} exceeds min(in, out) = {min(m.in_features, m.out_features)}", name
                )
            )
    module_dtypes = {d for m in info.modules.values() for d in m.dtypes.values()}
    if len(module_dtypes) > 1:
        out.append(warning("dtype-mix", f"LoRA tensors mix dtypes {', '.join(sorted(module_dtypes))}"))
    return out


def _data_findings(info: AdapterInfo, structural_ok: bool, options: ReadOptions) -> tuple[list[Finding], str | None]:
    """NaN/Inf in every tensor of the file, then (when the structure is sound) the content hash."""
    from .formats import load_adapter

    out = [
        error("nonfinite", f"tensor {key!r} has {bad} NaN/Inf values")
        for key, bad in _nonfinite_tensors(info.files[-1])
    ]
    if not structural_ok:
        return out, None
    computed = load_adapter(info.path, format=info.format, options=options).content_hash()
    recorded = info.record.content_hash if info.record else None
    if recorded and recorded != computed:
        out.append(
            error(
                "hash-mismatch",
                f"content hash {computed[:19]}… differs from the recorded {recorded[:19]}…: "
                "the tensors changed after loractl wrote them",
            )
        )
    return out, computed


def _nonfinite_tensors(weights: Path) -> list[tuple[str, int]]:
    """(key, count) for every tensor with NaN/Inf values, reading blocks of rows into one reused buffer.

    Memory stays near `SCAN_BYTES` (or one row) whatever a header declares, a sparse file's 4 GiB hole included.
    """
    from .io.checkpoint import Checkpoint
    from .ops.merge_io import ReusingReader

    if weights.suffix != ".safetensors":
        return []  # pickles are scanned through the loaded adapter's hash path only
    with Checkpoint(weights) as ckpt, ReusingReader(ckpt) as reader:
        return [(key, bad) for key in ckpt.names if (bad := _count_nonfinite(reader, key))]


def _count_nonfinite(reader: ReusingReader, key: str) -> int:
    """NaN/Inf values of one tensor, read as raw bytes in blocks of `SCAN_BYTES` (whole elements) into one
    reused buffer, whatever its row length: a 256 MiB row of a hostile file costs no more than a small one."""
    import torch

    from .errors import TruncatedFileError
    from .io.safetensors_header import DTYPE_SIZES
    from .io.tensor_bytes import torch_dtype
    from .stats import nonfinite

    info, where = reader.ckpt.info(key), reader.file_range(key)
    if info.dtype not in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2") or where.nbytes == 0:
        return 0  # integers and booleans are always finite
    size = DTYPE_SIZES[info.dtype]
    block = bytearray(min(where.nbytes, SCAN_BYTES - SCAN_BYTES % size))
    bad = 0
    with where.path.open("rb") as f:
        for start in range(0, where.nbytes, len(block)):
            n = min(len(block), where.nbytes - start)
            if _is_hole(where.path, where.offset + start, where.offset + start + n):
                continue
            f.seek(where.offset + start)
            view = memoryview(block)[:n]
            if f.readinto(view) != n:
                raise TruncatedFileError(f"tensor {key!r} ends past the end of the file", path=where.path)
            bad += nonfinite(torch.frombuffer(view, dtype=torch_dtype(info.dtype)))
    return bad


def _is_hole(path: Path, start: int, stop: int) -> bool:
    """Whether bytes [start, stop) of `path` were never written (a sparse file's hole reads as zeros: finite)."""
    import os

    if not hasattr(os, "SEEK_DATA"):
        return False
    with path.open("rb") as f:
        try:
            return os.lseek(f.fileno(), start, os.SEEK_DATA) >= stop
        except OSError:  # ENXIO: no data from `start` to the end of the file
            return True


def _full_vs_base(key: str, shape: tuple[int, ...], base: tuple[int, ...]) -> Finding:
    """A full tensor whose shape is not the base's: an error, or a warning for a grown vocabulary (new tokens:
    an embedding or head with more rows, as PEFT's `save_embedding_layers` stores it)."""
    if len(shape) == 2 and shape[1:] == base[1:] and shape[0] > base[0]:
        return warning("vocab-resized", f"full tensor {key!r} has {shape[0]} rows where the base has {base[0]}: the "
                       f"adapter adds tokens; 'loractl merge' grows a checkpoint base to {shape[0]} rows, a "
                       f"loader needs the base's embeddings resized to {shape[0]} first")  # fmt: skip
    return error("base-shape", f"full tensor {key!r} is {list(shape)} but the base has {list(base)}")


def _base_findings(info: AdapterInfo, base: Path) -> list[Finding]:
    from contextlib import closing

    from .bases import detect_base, open_base
    from .io.checkpoint import Checkpoint, other_base, same_base, scheme_of

    if detect_base(base) in ("bnb", "fp8"):  # quantized weights are checked as the tensors they stand for
        with closing(open_base(base)) as b:

            def other_quantized(recorded: str, views: dict[str, str]) -> str | None:
                actual = b.fingerprint(list(info.modules), scheme=scheme_of(recorded))  # None: quantized: cannot say
                same = actual is None or same_base(recorded, views, actual, lambda: b.fingerprint_views(info.modules))
                return None if same else actual

            return _checked_against(info, b.weights(), other_quantized)
    with Checkpoint(base) as ckpt:
        return _checked_against(info, ckpt, lambda recorded, views: other_base(ckpt, info.modules, recorded, views))


def _checked_against(
    info: AdapterInfo, tensors: Any, other: Callable[[str, dict[str, str]], str | None]
) -> list[Finding]:
    """The adapter's shapes against the base's `tensors`; its recorded base against `other` (the base's
    fingerprint when it is another base, else None)."""
    out = [f for name, m in info.modules.items() if (f := _module_vs_base(name, m, tensors)) is not None]
    for key, t in info.full_tensors.items():
        if key in tensors and tuple(tensors.info(key).shape) != tuple(t.shape):
            out.append(_full_vs_base(key, tuple(t.shape), tuple(tensors.info(key).shape)))
    recorded = info.record.base_fingerprint if info.record else None
    if recorded and not any(f.severity == "error" for f in out):
        assert info.record is not None
        if (actual := other(recorded, info.record.base_views)) is not None:
            out.append(
                error(
                    "base-fingerprint",
                    f"the adapter was made for another base (fingerprint {recorded[:19]}…, this base {actual[:19]}…)",
                )
            )
    return out


def _module_vs_base(name: str, m: Any, ckpt: Any) -> Finding | None:
    key = f"{name}.weight"
    if key not in ckpt:
        if name == "lm_head" and "model.embed_tokens.weight" in ckpt:
            return warning("base-tied", "the base ties lm_head to the embeddings; merging unties them", name)
        return error("base-missing", f"the base has no tensor {key!r}", name)
    expected: tuple[int, ...] = (m.out_features, m.in_features, *m.kernel)
    if m.kind == "embedding" or m.fan_in_fan_out:
        expected = (m.in_features, m.out_features)
    actual = tuple(ckpt.info(key).shape)
    if actual != expected:
        return error(
            "base-shape",
            f"the adapter expects a weight of shape {list(expected)} but the base has {list(actual)}",
            name,
        )
    return None
