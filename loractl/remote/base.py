"""What every registry offers (the `Remote` protocol) and the values it returns.

A version is one commit. Both registries, the Hub and a `file://` directory, share the
Hub's data model: commits with parents, branches that move only by compare-and-swap on
their head, immutable tags, and files identified by their git-blob sha1 and sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Protocol

from .errors import UnsafePathError

DEFAULT_BRANCH = "main"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit as the registry describes it; `sha256` is set for LFS/content-addressed files."""

    path: str
    size: int
    git_oid: str | None = None  # git-blob sha1 of the content (regular Hub files)
    sha256: str | None = None


@dataclass(frozen=True)
class LocalFile:
    """A file to push: its name in the repo, where it lies, and both hashes a registry may compare."""

    path: str
    source: Path | None
    data: bytes | None
    size: int
    git_oid: str
    sha256: str

    def same_as(self, remote: RemoteFile) -> bool:
        """Whether `remote` already holds these bytes (by the strongest hash it states)."""
        if remote.size != self.size:
            return False
        return remote.sha256 == self.sha256 if remote.sha256 else remote.git_oid == self.git_oid

    def content(self) -> bytes:
        return self.data if self.data is not None else self.source.read_bytes()  # type: ignore[union-attr]


@dataclass(frozen=True)
class Commit:
    """One version: its full sha, when, and the message it was pushed with."""

    sha: str
    date: datetime | None
    title: str
    message: str = ""


@dataclass(frozen=True)
class Refs:
    """Branch and tag names → full commit shas."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A fetched commit: its files as the registry lists them and, per file, a local copy to read."""

    sha: str
    files: dict[str, RemoteFile]
    sources: dict[str, Path]
    disposable: bool = False  # sources are a cache copy: a bad one may be deleted so the next pull refetches
    root: Path | None = None  # the directory every source must lie in (links resolved)


class Remote(Protocol):
    """A registry of versioned adapters (see `hf.HubRemote` and `local.LocalRemote`)."""

    @property
    def url(self) -> str: ...

    def create(self, *, private: bool) -> None:
        """Create the repository (with its initial commit); no-op when it exists."""

    def refs(self) -> Refs: ...

    def resolve(self, revision: str) -> str:
        """The full 40-hex sha a branch, tag, short or full sha names."""

    def files(self, sha: str) -> dict[str, RemoteFile]: ...

    def commits(self, branch: str) -> list[Commit]:
        """The branch's history, newest first."""

    def commit(
        self, branch: str, parent: str, adds: list[LocalFile], deletes: list[str], title: str, message: str
    ) -> str:
        """Land one commit on `branch` only if its head is still `parent`; `ConflictError` otherwise."""

    def create_branch(self, name: str, sha: str) -> None: ...

    def create_tag(self, name: str, sha: str) -> None:
        """Create a tag; `TagExistsError` when the name is taken."""

    def delete_tag(self, name: str) -> None:
        """Remove a tag; `RevisionNotFoundError` when there is none by that name."""

    def fetch(self, revision: str) -> Snapshot:
        """Resolve `revision`, check file names (`safe_relpath`), and bring the commit's files here."""

    def read_text(self, sha: str, path: str) -> str | None:
        """One small file of a commit (the model card), or None when the commit lacks it."""


def local_file(path: str, source: Path | None = None, data: bytes | None = None) -> LocalFile:
    """Describe a file to push, hashing it once (streamed when it is on disk)."""
    sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
    if data is not None:
        size = len(data)
        sha1.update(b"blob %d\0" % size)
        sha1.update(data)
        sha256.update(data)
    else:
        assert source is not None
        size = source.stat().st_size
        sha1.update(b"blob %d\0" % size)
        with source.open("rb") as f:
            while chunk := f.read(CHUNK):
                sha1.update(chunk)
                sha256.update(chunk)
    return LocalFile(path, source, data, size, sha1.hexdigest(), sha256.hexdigest())


def check_file(path: Path, expected: RemoteFile) -> str | None:
    """Why the bytes at `path` are not the registry's file, or None when they match."""
    got = local_file(expected.path, path)
    if got.size != expected.size:
        return f"size {got.size} but the registry says {expected.size}"
    if expected.sha256 and got.sha256 != expected.sha256:
        return f"sha256 {got.sha256[:12]}… but the registry says {expected.sha256[:12]}…"
    if not expected.sha256 and expected.git_oid and got.git_oid != expected.git_oid:
        return f"git blob {got.git_oid[:12]}… but the registry says {expected.git_oid[:12]}…"
    return None


def check_names(names: Iterable[str]) -> None:
    """Refuse a commit's file list that cannot be written under one directory: an unsafe name
    (`safe_relpath`), or a name that is both a file and a folder of another (`sub`, `sub/inner.txt`)."""
    listed = set(names)
    for name in sorted(listed):
        for parent in safe_relpath(name).parents:
            if str(parent) in listed:
                raise UnsafePathError(
                    f"the registry lists both a file {str(parent)!r} and {name!r} inside it",
                    hint="the repository is damaged or hostile; nothing was written",
                )


def safe_relpath(name: str) -> PurePosixPath:
    """`name` as a path that stays inside a directory; `UnsafePathError` for `..`, absolute or odd names."""
    parts = PurePosixPath(name).parts
    bad = not parts or name.startswith("/") or "\\" in name or "\0" in name or any(p in ("..", ".", "") for p in parts)
    if bad or name != "/".join(parts):
        raise UnsafePathError(
            f"the registry lists a file named {name!r}, which would be written outside the output",
            hint="the repository is damaged or hostile; nothing was written",
        )
    return PurePosixPath(name)
