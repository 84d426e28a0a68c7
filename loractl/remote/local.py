"""`file:///DIR/owner/name`: a registry in a local directory, with the Hub's semantics.

For offline work and for examples that must run anywhere. Commits, branches, immutable
tags and content-addressed files live in a `RepoStore`; nothing here talks to a network.
"""

from __future__ import annotations

from pathlib import Path

from .base import Commit, LocalFile, Refs, RemoteFile, Snapshot, check_names
from .registry_files import MAX_TEXT_BYTES
from .store import RepoStore


class LocalRemote:
    """The `Remote` protocol over `DIR/owner/name` (see `store.RepoStore` for the layout)."""

    def __init__(self, root: Path, repo_id: str) -> None:
        self.store = RepoStore(root / repo_id)
        self.repo_id = repo_id
        self._url = f"file://{(root / repo_id).resolve()}"

    @property
    def url(self) -> str:
        return self._url

    def create(self, *, private: bool) -> None:
        self.store.create(private=private)

    def refs(self) -> Refs:
        return Refs(branches=self.store.branches(), tags=self.store.tags())

    def resolve(self, revision: str) -> str:
        return self.store.resolve(revision)

    def files(self, sha: str) -> dict[str, RemoteFile]:
        return self.store.files(sha)

    def commits(self, branch: str) -> list[Commit]:
        return list(self.store.log(self.store.resolve(branch)))

    def commit(
        self, branch: str, parent: str, adds: list[LocalFile], deletes: list[str], title: str, message: str
    ) -> str:
        return self.store.commit(branch, parent, adds, deletes, title, message)

    def create_branch(self, name: str, sha: str) -> None:
        self.store.create_branch(name, sha)

    def create_tag(self, name: str, sha: str) -> None:
        self.store.create_tag(name, sha)

    def delete_tag(self, name: str) -> None:
        self.store.delete_tag(name)

    def fetch(self, revision: str) -> Snapshot:
        sha = self.store.resolve(revision)
        files = self.store.files(sha)
        check_names(files)
        sources = {p: self.store.blob(f.sha256 or "") for p, f in files.items()}
        return Snapshot(sha, files, sources, root=self.store.path)

    def read_text(self, sha: str, path: str) -> str | None:
        f = self.store.files(sha).get(path)
        return self.store.read_object(f, MAX_TEXT_BYTES).decode("utf-8", "replace") if f else None
