"""A merge that grows the vocabulary: an adapter holding its embeddings and head whole, with new token rows.

Training with new tokens (`train --add-tokens`, PEFT's `save_embedding_layers`) saves the resized
input embeddings and head with the adapter. PEFT's user resizes the base (`resize_token_embeddings`),
loads the adapter (its saved tensors replace the resized ones, every row) and merges
(`merge_and_unload`): the merged model is the adapter's tensors at the new size, LoRA merged on
top, and `vocab_size` in config.json the new row count. The merge plan does the same from headers:
the grown tensors replace the base's at their own shape, every vocabulary-sized tensor of the base
must grow to the same size (a model half resized is refused), and the tokenizer saved beside the
adapter (it knows the new tokens) replaces the base's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..findings import Finding, error

# What `save_pretrained` writes for a tokenizer (fast, slow, BPE, SentencePiece) and its chat template.
_TOKENIZER_FILE = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|"
                             r"merges\.txt|chat_template\.(jinja|json)|spiece\.model")  # fmt: skip


def grows(shape: tuple[int, ...], base: tuple[int, ...]) -> bool:
    """Whether a (rows, dim) tensor of `shape` is the base's `base` tensor with rows added."""
    return len(shape) == 2 and len(base) == 2 and shape[1] == base[1] and shape[0] > base[0]


def vocab_findings(
    resized: Mapping[str, tuple[int, ...]], vocab_tensors: Mapping[str, tuple[int, ...]], config: dict[str, Any] | None
) -> list[Finding]:
    """Problems of a grown vocabulary: tensors grown to different sizes, vocabulary tensors left at the old size,
    a config.json without `vocab_size` to update."""
    if not resized:
        return []
    sizes = sorted({shape[0] for shape in resized.values()})
    if len(sizes) > 1:
        return [error("vocab-sizes", f"the adapters grow the vocabulary to different sizes: {sizes}")]
    old = {shape[0] for name, shape in vocab_tensors.items() if name in resized}
    left = [n for n, shape in vocab_tensors.items() if n not in resized and shape[0] in old]
    out = [error("vocab-partial", f"the adapter grows the vocabulary to {sizes[0]} rows but not {n!r}") for n in left]
    if config is not None and "vocab_size" not in config:
        out.append(error("vocab-config", "config.json has no top-level vocab_size to set to the grown vocabulary"))
    return out


def vocab_config(resized: Mapping[str, tuple[int, ...]], config: dict[str, Any] | None) -> dict[str, Any]:
    """config.json's new `vocab_size` when the vocabulary grows."""
    if not resized or config is None:
        return {}
    return {"vocab_size": next(iter(resized.values()))[0]}


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files saved in `directory` (none when it is not a directory)."""
    if not directory.is_dir():
        return []
    return [p for p in sorted(directory.iterdir()) if p.is_file() and _TOKENIZER_FILE.fullmatch(p.name)]


def tokenizer_findings(
    resized: Mapping[str, tuple[int, ...]], files: Sequence[Path], adapters: Sequence[str | Path]
) -> list[Finding]:
    """A grown vocabulary with no tokenizer saved beside any adapter, while the base's would be copied: the merged
    model would ship a tokenizer that knows none of the new tokens (an adapter pulled without its tokenizer)."""
    if not resized or any(tokenizer_files(Path(a)) for a in adapters):
        return []
    if not any(_TOKENIZER_FILE.fullmatch(p.name) for p in files):
        return []  # a base without a tokenizer: the merged model has none either, and claims nothing
    rows = next(iter(resized.values()))[0]
    message = (f"the adapter grows the vocabulary to {rows} rows but no tokenizer is saved beside it: the base's "
               "tokenizer, which lacks the new tokens, would be copied into the merged model")  # fmt: skip
    hint = "save the tokenizer the adapter was trained with into the adapter's directory (train writes it there)"
    return [Finding("vocab-tokenizer", "error", message, path=", ".join(map(str, adapters)), hint=hint)]


def with_adapter_tokenizer(files: Sequence[Path], adapters: Sequence[str | Path]) -> list[Path]:
    """The base's files to copy, its tokenizer files replaced by those saved beside the adapters."""
    saved = {p.name: p for a in adapters for p in tokenizer_files(Path(a))}
    if not saved:
        return list(files)
    kept = [p for p in files if not _TOKENIZER_FILE.fullmatch(p.name)]
    return [*kept, *saved.values()]
