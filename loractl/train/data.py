"""Training data: JSONL lines → token ids with loss labels (-100 where no loss is taken).

Three line shapes, detected per line:
    {"text": ...}                          loss on every token
    {"prompt": ..., "completion": ...}     loss on the completion only
    {"messages": [{"role", "content"}...]} the tokenizer's chat template; loss on assistant turns
Examples are truncated to `max_len`; `pack` concatenates short ones into full rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..data_sources import JSONL, DataOptions, read_rows
from ..errors import FormatError, UsageError

IGNORE = -100


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer the data layer uses."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Example:
    """One training row: `input_ids` and `labels` of equal length (labels IGNORE where no loss).

    `starts`: where each example of a packed row begins; attention and positions restart there.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    starts: tuple[int, ...] = (0,)

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def by_length(examples: Sequence[Example]) -> list[Example]:
    """`examples` longest first: batches cut from them pad little (an evaluation's sum does not depend on order)."""
    return sorted(examples, key=lambda ex: -len(ex.input_ids))


@dataclass(frozen=True)
class Dataset:
    """Tokenized examples, with the file's sha256 for lineage and the count of dropped lines."""

    examples: tuple[Example, ...]
    sha256: str
    dropped: int = 0  # lines left with no loss token after truncation

    def __len__(self) -> int:
        return len(self.examples)


def require_data_file(path: str | Path) -> Path:
    """The data's path: a JSONL or data file, a saved dataset directory, or a Hub dataset id (checked as such)."""
    from ..data_sources import check_source  # torch-free

    return check_source(path)


def load_dataset(
    path: str | Path, tokenizer: Tokenizer, max_len: int, *, packing: bool = False, options: DataOptions | None = None
) -> Dataset:
    """Read and tokenize `path`: JSONL here, anything else (or mapped columns, streaming) through `datasets`.

    `FormatError` names the first bad line (row), `UsageError` an empty source.
    """
    path = require_data_file(path)
    options = options or DataOptions()
    if path.suffix.lower() in JSONL and path.is_file() and not options.needs_datasets:
        raw = path.read_bytes()
        lines = raw.decode("utf-8", errors="replace").splitlines()
        docs = ((n, _parse(line, n, path)) for n, line in enumerate(lines, start=1) if line.strip())
        identity = "sha256:" + hashlib.sha256(raw).hexdigest()
    else:
        rows, identity = read_rows(path, options)
        docs = ((n, _checked(row, n, path)) for n, row in enumerate(rows, start=1))
    examples, dropped = [], 0
    for number, doc in docs:
        example = _truncate(tokenize(doc, tokenizer, number, path), max_len)
        if example.num_targets:
            examples.append(example)
        else:
            dropped += 1
    if not examples:
        hint = f"all {dropped} lines lost their loss tokens at --max-len {max_len}" if dropped else "add JSONL lines"
        raise UsageError(f"no training examples in {path}", hint=hint, path=None)
    out = pack(examples, max_len) if packing else examples
    return Dataset(tuple(out), identity, dropped)


def tokenize(doc: dict[str, Any], tokenizer: Tokenizer, number: int = 0, path: Path | None = None) -> Example:
    """One parsed line as token ids and labels."""
    if "messages" in doc:
        return _chat(doc["messages"], tokenizer, number, path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "prompt" in doc:
        prompt = tokenizer.encode(_string(doc, "prompt", number, path), add_special_tokens=True)
        completion = tokenizer.encode(_string(doc, "completion", number, path), add_special_tokens=False) + eos
        return Example(tuple(prompt + completion), tuple([IGNORE] * len(prompt) + completion))
    ids = tokenizer.encode(_string(doc, "text", number, path), add_special_tokens=True) + eos
    return Example(tuple(ids), tuple(ids))


def pack(examples: Sequence[Example], max_len: int) -> list[Example]:
    """Concatenate examples into rows of up to `max_len` tokens (an example is never split).

    Each row records where its examples start: `collate` restarts the positions there, and
    transformers' attention then keeps each example to itself (a block-diagonal causal mask).
    The first label of each example is masked, so no row learns to predict across a seam.
    """
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_len:
            rows.append(Example(tuple(ids), tuple(labels), tuple(starts)))
            ids, labels, starts = [], [], []
        starts.append(len(ids))
        ids += ex.input_ids
        labels += (IGNORE, *ex.labels[1:])
    if ids:
        rows.append(Example(tuple(ids), tuple(labels), tuple(starts)))
    return rows


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` tensors, (batch, longest).

    With packed rows, also `position_ids` that restart at every example (padding continues the last).
    """
    longest = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(len(ex.starts) > 1 for ex in examples):
        batch["position_ids"] = torch.stack([_positions(ex.starts, longest) for ex in examples])
    return batch


def _positions(starts: tuple[int, ...], length: int) -> torch.Tensor:
    """0, 1, 2, ... restarting at each of `starts`."""
    positions = torch.arange(length)
    for start in starts[1:]:
        positions[start:] -= positions[start].clone()
    return positions


def _parse(line: str, number: int, path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise FormatError(f"line {number} is not valid JSON ({e.args[0] if e.args else e})", path=path) from None
    return _checked(doc, number, path)


def _checked(doc: Any, number: int, path: Path) -> dict[str, Any]:
    """`doc` when it has one of the three shapes' keys; `FormatError` naming line (row) `number` otherwise."""
    if not isinstance(doc, dict) or not ({"text", "prompt", "messages"} & doc.keys()):
        keys = (
            f" (its keys: {', '.join(sorted(doc))[:120]}; map them with --data-columns)"
            if isinstance(doc, dict)
            else ""
        )
        raise FormatError(
            f"line {number} has none of the keys text, prompt+completion, messages{keys}",
            path=path,
            hint='each line is {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}',
        )
    return doc


def _string(doc: dict[str, Any], key: str, number: int, path: Path | None) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise FormatError(f"line {number}: {key!r} must be a string, got {type(value).__name__}", path=path)
    return value


def _chat(messages: Any, tokenizer: Tokenizer, number: int, path: Path | None) -> Example:
    """Render with the chat template; label the tokens each assistant turn adds to the rendering."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise FormatError(f"line {number}: 'messages' must be a list of {{role, content}} objects", path=path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(
            "the tokenizer has no chat template, so 'messages' lines cannot be rendered",
            hint="use text or prompt/completion lines, or a base with a chat template",
        )
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        start, end = len(prefix), len(_render(tokenizer, messages[: i + 1], False))
        if ids[:start] != prefix:
            raise UsageError(
                f"line {number}: the chat template does not render turns as prefixes",
                path=path,
                hint="loss masking on assistant turns needs a prefix-stable template",
            )
        labels[start:end] = ids[start:end]
    return Example(tuple(ids), tuple(labels))


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    if not messages and not generation_prompt:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer.encode(str(text), add_special_tokens=False)


def _truncate(example: Example, max_len: int) -> Example:
    return Example(example.input_ids[:max_len], example.labels[:max_len])
