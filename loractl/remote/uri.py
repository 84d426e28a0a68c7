"""REPO arguments: `owner/name[@REV]`, `hf://owner/name[@REV]`, `file:///DIR/owner/name[@REV]`, and the registry each names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .errors import RemoteURIError

if TYPE_CHECKING:
    from .base import Remote

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_HINT = "write owner/name, hf://owner/name[@REV] or file:///DIR/owner/name[@REV] (quote '/' in REV as %2F)"


@dataclass(frozen=True)
class RemoteURI:
    """A parsed REPO: which registry, which repository, and the revision if one was named."""

    scheme: str  # "hf" | "file"
    repo_id: str
    revision: str | None = None
    root: Path | None = None  # the registry directory for file://

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        where = f"file://{self.root}/" if self.root is not None else "hf://"
        return f"{where}{self.repo_id}{rev}"


def parse_uri(text: str) -> RemoteURI:
    """Parse a REPO argument; `RemoteURIError` (a usage error) for anything else."""
    if text.startswith("file://"):
        return _parse_file(text[len("file://") :], text)
    body = text[len("hf://") :] if text.startswith("hf://") else text
    if "://" in body:
        raise RemoteURIError(f"unknown registry in {text!r}", hint=_HINT)
    name, _, rev = body.partition("@")
    return RemoteURI("hf", _repo_id(name, text), _revision(rev, text))


def _parse_file(rest: str, text: str) -> RemoteURI:
    if not rest.startswith("/"):
        raise RemoteURIError(f"{text!r} is not an absolute file:// URI", hint="write file:///absolute/dir/owner/name")
    path, _, rev = rest.partition("@")
    parts = Path(unquote(path)).parts
    if len(parts) < 4:
        raise RemoteURIError(f"{text!r} names no owner/name under a registry directory", hint=_HINT)
    return RemoteURI("file", _repo_id("/".join(parts[-2:]), text), _revision(rev, text), Path(*parts[:-2]))


def _repo_id(name: str, text: str) -> str:
    name = name.rstrip("/")
    if not _REPO_ID.fullmatch(name) or ".." in name:
        raise RemoteURIError(f"{text!r} is not a repository name", hint=_HINT)
    return name


def _revision(rev: str, text: str) -> str | None:
    rev = unquote(rev)
    if "@" in text and not rev:
        raise RemoteURIError(f"{text!r} has an empty revision after '@'", hint=_HINT)
    return rev or None


def open_remote(uri: RemoteURI, *, endpoint: str | None = None, token: str | None = None) -> Remote:
    """The registry a parsed REPO names; `endpoint`/`token` apply to the Hub only."""
    if uri.scheme == "file":
        from .local import LocalRemote

        assert uri.root is not None
        return LocalRemote(Path(uri.root), uri.repo_id)
    from .hf import HubRemote

    return HubRemote(uri.repo_id, endpoint=endpoint, token=token)
