"""A registry on disk with the Hub's data model: the `file://` backend (and the test Hub's storage).

Layout of one repository directory::

    repo.json                 {"private": bool}
    objects/<sha256>          file contents, content-addressed, written once
    commits/<sha>.json        {"parent", "date", "title", "message", "files": {path: {size, sha1, sha256}}}
    refs/heads/<branch>       the branch head's sha (branch names may contain '/')
    refs/tags/<tag>           the tagged sha; never rewritten
    lock                      flock'ed around every ref update

A commit's sha is the sha1 of its canonical JSON, so it names its content, parent and time.
Ref updates happen under the lock and by `os.replace`, so concurrent writers (threads or
processes) see compare-and-swap semantics: a commit whose parent is no longer the head
is refused, never applied on top.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .base import DEFAULT_BRANCH, Commit, LocalFile, RemoteFile, local_file, safe_relpath
from .errors import ConflictError, RepoNotFoundError, RevisionNotFoundError, TagExistsError

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT = re.compile(r"[0-9a-f]{5,39}")
_REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")


class RepoStore:
    """One repository directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- repository -------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "repo.json").is_file()

    @property
    def private(self) -> bool:
        return bool(self._json(self.path / "repo.json").get("private"))

    def create(self, *, private: bool) -> bool:
        """Create with an initial `.gitattributes` commit on main; False when it already existed."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if self.exists():
                return False
            for sub in ("objects", "commits", "refs/heads", "refs/tags"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            attrs = local_file(".gitattributes", data=GITATTRIBUTES)
            self.put(attrs)
            sha = self._write_commit(None, {attrs.path: _entry(attrs)}, "initial commit", "")
            _write_atomic(self._ref("heads", DEFAULT_BRANCH), sha)
            _write_atomic(self.path / "repo.json", json.dumps({"private": private}))
            return True

    def require(self) -> None:
        if not self.exists():
            raise RepoNotFoundError(
                f"repository {self.path.parent.name}/{self.path.name} not found",
                path=self.path,
                hint="check the path; push with --create to make it",
            )

    # -- blobs --------------------------------------------------------------------------------
    def blob(self, sha256: str) -> Path:
        return self.path / "objects" / sha256

    def put(self, f: LocalFile) -> None:
        """Store a file's bytes under their sha256 (no-op when present)."""
        self.put_bytes(f.content(), f.sha256)

    def put_bytes(self, data: bytes, sha256: str) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("content does not match its sha256")
        if not self.blob(sha256).exists():
            _write_atomic(self.blob(sha256), data)

    # -- refs -----------------------------------------------------------------------------------
    def branches(self) -> dict[str, str]:
        return self._refs("heads")

    def tags(self) -> dict[str, str]:
        return self._refs("tags")

    def resolve(self, revision: str) -> str:
        """Branch, tag, full or unique short sha → full sha; `RevisionNotFoundError` otherwise."""
        self.require()
        for kind in ("heads", "tags"):
            ref = self._ref(kind, revision)
            if _inside(ref, self.path / "refs" / kind) and ref.is_file():
                return ref.read_text().strip()
        if _SHA.fullmatch(revision) and (self.path / "commits" / f"{revision}.json").is_file():
            return revision
        if _SHORT.fullmatch(revision):
            found = [p.stem for p in (self.path / "commits").glob(f"{revision}*.json")]
            if len(found) == 1:
                return found[0]
        raise RevisionNotFoundError(
            f"no branch, tag or commit {revision!r} in {self.name}",
            hint=f"list them with 'loractl versions file://{self.path}'",
        )

    def create_branch(self, name: str, sha: str) -> None:
        check_ref_name(name)
        with self.locked():
            ref = self._ref("heads", name)
            if ref.exists():
                raise ConflictError(f"branch {name!r} already exists in {self.name}")
            _write_atomic(ref, sha)

    def create_tag(self, name: str, sha: str) -> None:
        """Tags are immutable: an existing name is refused even when it points at `sha`."""
        check_ref_name(name)
        with self.locked():
            ref = self._ref("tags", name)
            if ref.exists():
                raise TagExistsError(f"tag {name!r} already exists in {self.name}, on {ref.read_text().strip()[:12]}")
            _write_atomic(ref, sha)

    def delete_tag(self, name: str) -> str:
        """Remove a tag on purpose (`loractl tag --delete`, `push --force-tag`); returns the sha it named."""
        check_ref_name(name)
        with self.locked():
            ref = self._ref("tags", name)
            if not (_inside(ref, self.path / "refs" / "tags") and ref.is_file()):
                raise RevisionNotFoundError(f"no tag {name!r} in {self.name}")
            sha = ref.read_text().strip()
            ref.unlink()
            return sha

    # -- commits ----------------------------------------------------------------------------------
    def commit(
        self, branch: str, parent: str | None, adds: list[LocalFile], deletes: list[str], title: str, message: str
    ) -> str:
        """Land one commit on `branch` iff its head is `parent` (None: the current head); returns the sha."""
        for f in adds:
            safe_relpath(f.path)
            self.put(f)
        with self.locked():
            head = self._head(branch)
            if parent is not None and head != self.resolve(parent):
                raise ConflictError(
                    f"branch {branch!r} of {self.name} moved since the push started (now {head[:12]})",
                    hint="pull or inspect the new head, then push again",
                )
            files = {k: v for k, v in self.tree(head).items() if k not in deletes}
            files.update({f.path: _entry(f) for f in adds})
            sha = self._write_commit(head, files, title, message)
            _write_atomic(self._ref("heads", branch), sha)
            return sha

    def plant(self, branch: str, path: str, data: bytes) -> str:
        """Commit a file without checking its name: tests use it to build hostile repositories."""
        f = local_file(path, data=data)
        self.put(f)
        with self.locked():
            head = self._head(branch)
            sha = self._write_commit(head, {**self.tree(head), path: _entry(f)}, f"plant {path}", "")
            _write_atomic(self._ref("heads", branch), sha)
            return sha

    def tree(self, sha: str) -> dict[str, dict[str, Any]]:
        return dict(self._commit_doc(sha)["files"])

    def files(self, sha: str) -> dict[str, RemoteFile]:
        return {p: RemoteFile(p, e["size"], e["sha1"], e["sha256"]) for p, e in self.tree(sha).items()}

    def info(self, sha: str) -> Commit:
        doc = self._commit_doc(sha)
        date = datetime.strptime(doc["date"], DATE_FORMAT).replace(tzinfo=timezone.utc)
        return Commit(sha, date, doc["title"], doc["message"])

    def log(self, sha: str) -> Iterator[Commit]:
        """`sha` and its ancestors, newest first."""
        current: str | None = sha
        while current:
            yield self.info(current)
            current = self._commit_doc(current)["parent"]

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive flock on `lock`: serialises ref updates across threads and processes."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / "lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- internals ----------------------------------------------------------------------------------
    def _head(self, branch: str) -> str:
        self.require()
        ref = self._ref("heads", branch)
        if not (_inside(ref, self.path / "refs" / "heads") and ref.is_file()):
            raise RevisionNotFoundError(f"no branch {branch!r} in {self.name}")
        return ref.read_text().strip()

    def _ref(self, kind: str, name: str) -> Path:
        return self.path / "refs" / kind / name

    def _refs(self, kind: str) -> dict[str, str]:
        self.require()
        base = self.path / "refs" / kind
        return {p.relative_to(base).as_posix(): p.read_text().strip() for p in sorted(base.rglob("*")) if p.is_file()}

    def _commit_doc(self, sha: str) -> dict[str, Any]:
        path = self.path / "commits" / f"{sha}.json"
        if not (_SHA.fullmatch(sha) and path.is_file()):
            raise RevisionNotFoundError(f"no commit {sha!r} in {self.name}")
        return self._json(path)

    def _write_commit(self, parent: str | None, files: dict[str, Any], title: str, message: str) -> str:
        date = datetime.now(timezone.utc).strftime(DATE_FORMAT)
        doc = {"parent": parent, "date": date, "title": title, "message": message, "files": dict(sorted(files.items()))}
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        sha = hashlib.sha1(raw.encode()).hexdigest()
        _write_atomic(self.path / "commits" / f"{sha}.json", raw)
        return sha

    @staticmethod
    def _json(path: Path) -> dict[str, Any]:
        return json.loads(path.read_text())  # type: ignore[no-any-return]


def check_ref_name(name: str) -> None:
    """Refuse branch and tag names git would refuse (and any that could escape `refs/`)."""
    if not _REF_NAME.fullmatch(name) or ".." in name or "//" in name or name.endswith(("/", ".lock")):
        raise UsageError(f"invalid branch or tag name {name!r}", hint="use letters, digits, '.', '_', '-' and '/'")


def _entry(f: LocalFile) -> dict[str, Any]:
    return {"size": f.size, "sha1": f.git_oid, "sha256": f.sha256}


def _inside(path: Path, base: Path) -> bool:
    return ".." not in path.relative_to(base).parts


def _write_atomic(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
