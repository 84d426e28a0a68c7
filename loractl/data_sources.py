"""Training rows from the `datasets` library: a Hub dataset, a local parquet/arrow/csv/json file, a saved dataset.

`--data` names one of them, or a directory of data files such as a downloaded Hub dataset repository
(datasets reads it as it reads the Hub's; a JSONL file is read by `data.load_dataset` itself, unless columns are
mapped). The rows are dicts; `columns` renames them into the three shapes `data.tokenize` reads
(`text=body` makes the `body` column the text). With `streaming`, rows are read as the source
yields them and tokenized one at a time: neither the raw data nor a datasets cache of it is kept,
only the token ids. Offline (`HF_HUB_OFFLINE=1`), a Hub dataset loads from the datasets cache when
it was loaded before; otherwise one error says so.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputNotFoundError, LoractlError, UsageError
from .extras import require_extra

BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_ROLES = ("text", "prompt", "completion", "messages")
JSONL = (".jsonl", ".ndjson")
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DataOptions:
    """How `--data` is read through `datasets`: split, config (subset), streaming, column renames."""

    split: str = "train"
    config: str | None = None
    streaming: bool = False
    columns: tuple[tuple[str, str], ...] = ()  # (role, column): text=body → ("text", "body")

    @property
    def needs_datasets(self) -> bool:
        """Whether a JSONL file must go through `datasets` too (split and config name Hub or saved datasets)."""
        return self.streaming or bool(self.columns)


def parse_columns(value: str | None) -> tuple[tuple[str, str], ...]:
    """`text=body,prompt=question` → (("text", "body"), ("prompt", "question")); roles are checked."""
    pairs = []
    for item in (value or "").split(","):
        if not item.strip():
            continue
        role, sep, column = (s.strip() for s in item.partition("="))
        if not sep or role not in _ROLES or not column:
            raise UsageError(f"--data-columns {item!r} is not ROLE=COLUMN with ROLE one of {', '.join(_ROLES)}",
                             hint="e.g. --data-columns text=body or messages=conversation")  # fmt: skip
        pairs.append((role, column))
    return tuple(pairs)


def check_source(spec: str | Path) -> Path:
    """`spec` as a path when it is a JSONL or data file, a saved dataset directory, or a Hub dataset id.

    `InputNotFoundError` otherwise: a path with a file suffix that does not exist is a missing file,
    not a Hub id.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in (*JSONL, *BUILDERS):
            raise UsageError(f"data file {path} is not JSONL, parquet, arrow, csv or json",
                             hint="convert it, or save it with datasets' save_to_disk and give the directory")  # fmt: skip
        return path
    if path.is_dir():
        if not _saved_dir(path) and not any(p.suffix.lower() in BUILDERS for p in path.rglob("*") if p.is_file()):
            raise InputNotFoundError(f"data directory {path} holds no dataset",
                                     hint="give a directory save_to_disk wrote or one holding data files")  # fmt: skip
        return path
    if path.suffix.lower() in (*JSONL, *BUILDERS) or not _HUB_ID.fullmatch(str(spec)):
        InputNotFoundError.check(path, "data file ")
    return path


def read_rows(spec: str | Path, options: DataOptions) -> tuple[Iterator[dict[str, Any]], str]:
    """The rows of `spec` with the columns renamed, and the identity lineage records for the data."""
    require_extra("data", purpose="--data through the datasets library")
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec)
    try:
        if path.is_dir() and _saved_dir(path):
            data = _saved(path, options)
            identity = f"datasets:{getattr(data, '_fingerprint', None) or _digest(str(path.resolve()))}"
        elif path.is_file():
            data = datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                                         streaming=options.streaming)  # fmt: skip
            identity = "sha256:" + _file_sha256(path)
        else:
            data = datasets.load_dataset(str(spec), name=options.config, split=options.split,
                                         streaming=options.streaming)  # fmt: skip
            identity = f"datasets:{spec}:{options.config or ''}:{options.split}:{getattr(data, '_fingerprint', '')}"
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise LoractlError(f"cannot read dataset {spec}: {str(e).splitlines()[0][:200]}",
                           hint=_hint(spec, options)) from None  # fmt: skip
    return (_renamed(row, options.columns) for row in data), identity


def _saved(path: Path, options: DataOptions) -> Any:
    """A `save_to_disk` directory: a Dataset, or one split of a DatasetDict."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if options.split not in data:
            raise UsageError(f"dataset {path} has no split {options.split!r}",
                             hint=f"its splits: {', '.join(data)}; pick one with --data-split")  # fmt: skip
        data = data[options.split]
    return data.to_iterable_dataset() if options.streaming else data


def _saved_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in SAVED_MARKERS)


def _renamed(row: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in _ROLES}
    for role, column in columns:
        if column in row:
            out[role] = row[column]
    return out


def _hint(spec: str | Path, options: DataOptions) -> str:
    if Path(spec).exists():
        return "a data file is parquet, arrow, csv, json or jsonl; a directory is one save_to_disk wrote"
    return ("a Hub dataset id owner/name (with --data-split, --data-config); offline (HF_HUB_OFFLINE=1) it must be "
            "in the datasets cache from an earlier load")  # fmt: skip


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
