"""Adapter arguments that may name a registry version: `hf://owner/name@v1`, `file:///DIR/owner/name@v2`.

Commands that only read adapters (diff, eval) accept these beside paths: the version is pulled
(verified, as `pull` does) into a temporary directory that lives as long as the caller needs it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputNotFoundError

SCHEMES = ("hf://", "file://")


def is_reference(text: str | Path) -> bool:
    """Whether `text` names a registry version rather than a local path."""
    return isinstance(text, str) and text.startswith(SCHEMES)


def check_paths(refs: Iterable[str | Path]) -> None:
    """Every argument that is a path exists (a registry version is checked when it is pulled)."""
    for ref in refs:
        if not is_reference(ref):
            InputNotFoundError.check(ref)


@contextmanager
def local_copy(ref: str | Path, *, endpoint: str | None = None, token: str | None = None) -> Iterator[Path]:
    """A local path for `ref`: the path itself, or a verified pull that is deleted on exit."""
    if not is_reference(ref):
        yield Path(ref)
        return
    from .transfer import pull

    with tempfile.TemporaryDirectory(prefix="loractl-ref-") as tmp:
        out = Path(tmp) / "adapter"
        pull(str(ref), out, endpoint=endpoint, token=token)
        yield out
