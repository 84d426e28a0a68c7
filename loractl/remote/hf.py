"""`hf://owner/name`: the Hugging Face Hub through `huggingface_hub` (the only module importing it).

Every call passes `endpoint=` and `token=` explicitly; every exception is translated by type
and status code (`hf_errors.translate`), never by message text. Pull resolves the revision
first (`model_info(revision).sha`) and records the answer in the HF cache's `refs/` so that
an offline pull of the same name finds it again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from .base import Commit, LocalFile, Refs, RemoteFile, Snapshot, check_names
from .errors import OfflineError, RegistryDamagedError, RemoteFileNotFoundError
from .hf_errors import translate
from .registry_files import MAX_TEXT_BYTES, read_bounded
from .retry import with_retries
from .store import MAX_HISTORY

T = TypeVar("T")
_SHA = 40


class HubRemote:
    """The `Remote` protocol over one Hub repository (model type)."""

    def __init__(
        self, repo_id: str, *, endpoint: str | None = None, token: str | None = None, cache_dir: Path | None = None
    ) -> None:
        from huggingface_hub import HfApi, constants

        self.repo_id = repo_id
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.cache_dir = cache_dir
        self.api = HfApi(endpoint=self.endpoint, token=token)

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    def create(self, *, private: bool) -> None:
        self._call(lambda: self.api.create_repo(self.repo_id, private=private, exist_ok=True))

    def refs(self) -> Refs:
        refs = self._read(lambda: self.api.list_repo_refs(self.repo_id))
        return Refs({b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags})

    def resolve(self, revision: str) -> str:
        return self._read(lambda: self._resolve_online(revision))

    def files(self, sha: str) -> dict[str, RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        tree = self._read(lambda: list(self.api.list_repo_tree(self.repo_id, revision=sha, recursive=True)))
        return {
            f.path: _remote_file(f.path, f.size, f.blob_id, f.lfs.sha256 if f.lfs else None)
            for f in tree
            if isinstance(f, RepoFile)
        }

    def commits(self, branch: str) -> list[Commit]:
        log = self._read(
            lambda: list(islice(self.api.list_repo_commits(self.repo_id, revision=branch), MAX_HISTORY + 1))
        )
        if len(log) > MAX_HISTORY:
            raise RegistryDamagedError(f"the history of {branch!r} goes deeper than {MAX_HISTORY:,} commits")
        return [Commit(c.commit_id, c.created_at, c.title, c.message) for c in log]

    def commit(
        self, branch: str, parent: str, adds: list[LocalFile], deletes: list[str], title: str, message: str
    ) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = [CommitOperationAdd(f.path, f.source if f.source is not None else f.content()) for f in adds]
        ops += [CommitOperationDelete(p) for p in deletes]
        info = self._call(
            lambda: self.api.create_commit(
                self.repo_id,
                ops,
                commit_message=title,
                commit_description=message,
                revision=branch,
                parent_commit=parent,
            )
        )
        return str(info.oid)

    def create_branch(self, name: str, sha: str) -> None:
        self._call(lambda: self.api.create_branch(self.repo_id, branch=name, revision=sha))

    def create_tag(self, name: str, sha: str) -> None:
        self._call(lambda: self.api.create_tag(self.repo_id, tag=name, revision=sha), tag=name)

    def delete_tag(self, name: str) -> None:
        self._call(lambda: self.api.delete_tag(self.repo_id, tag=name))

    def fetch(self, revision: str) -> Snapshot:
        """Resolve, list and download one commit; offline, the HF cache serves what it holds."""
        try:
            sha = self.resolve(revision)
            files = self.files(sha)
            offline = False
        except OfflineError:
            sha, files, offline = self._cached(revision)
        check_names(files)
        folder = self._read(lambda: self._download(sha, offline))
        return Snapshot(sha, files, {p: Path(folder) / p for p in files}, disposable=True, root=self._storage())

    def probe(self, timeout: float) -> None:
        """One request for the repository, without retries; a `RemoteError` when it fails (unreachable: offline)."""
        self._call(lambda: self.api.model_info(self.repo_id, timeout=timeout))

    def cached(self, revision: str = "main") -> Path | None:
        """The directory of the HF cache's snapshot of `revision`; None when the cache holds none."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(self.repo_id, revision=revision, local_files_only=True, **self._dl_args()))
        except LocalEntryNotFoundError:
            return None

    def read_text(self, sha: str, path: str) -> str | None:
        from huggingface_hub import hf_hub_download

        try:
            local = self._read(lambda: hf_hub_download(self.repo_id, path, revision=sha, **self._dl_args()))
        except RemoteFileNotFoundError:
            return None
        return read_bounded(Path(local), self._storage(), path, MAX_TEXT_BYTES).decode("utf-8", "replace")

    # -- internals ------------------------------------------------------------------------------
    def _resolve_online(self, revision: str) -> str:
        sha = self.api.model_info(self.repo_id, revision=revision).sha
        if sha is None or len(sha) != _SHA:
            raise RemoteFileNotFoundError(f"the registry gave no commit sha for {revision!r}")
        if sha != revision:
            ref = self._storage() / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(sha)
            os.replace(tmp, ref)
        return str(sha)

    def _cached(self, revision: str) -> tuple[str, dict[str, RemoteFile], bool]:
        """Offline: the sha from the cache's refs, the file list from its tree cache."""
        from huggingface_hub._tree_cache import read_tree_cache

        sha = self._call(
            lambda: (
                self.api.resolve_revision(
                    self.repo_id, revision=revision, cache_dir=self.cache_dir, local_files_only=True
                ).resolved
            )
        )
        tree = read_tree_cache(str(self._storage()), sha)
        if tree is None:
            raise OfflineError(f"{self.repo_id}@{revision} is not cached", hint="pull it once while online")
        return sha, {p: _remote_file(p, e.size, e.blob_id, e.lfs_sha256) for p, e in tree.items()}, True

    def _download(self, sha: str, offline: bool) -> str:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(self.repo_id, revision=sha, local_files_only=offline, **self._dl_args()))

    def _dl_args(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "token": self.token, "cache_dir": self.cache_dir}

    def _storage(self) -> Path:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        root = Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
        return root / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    def _call(self, call: Callable[[], T], *, tag: str | None = None) -> T:
        try:
            return call()
        except Exception as e:
            mapped = translate(e, self.repo_id, self.token, tag=tag)
            if mapped is None:
                raise
            raise mapped from e

    def _read(self, call: Callable[[], T]) -> T:
        return with_retries(lambda: self._call(call))


def _remote_file(path: str, size: int, git_oid: str | None, sha256: str | None) -> RemoteFile:
    return RemoteFile(path, size, git_oid if sha256 is None else None, sha256)
