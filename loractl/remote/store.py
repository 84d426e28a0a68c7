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

The directory may be hostile (anyone who can write it can plant anything): every record is
read bounded (`registry_files`), a commit must hash to its name, every hash in it must be a
hex digest of its length (never a path), every ref a full sha, and history is walked with a
visited set and a depth cap. What fails is a `RegistryDamagedError` naming the record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io.atomic import atomic_output
from .base import DEFAULT_BRANCH, Commit, LocalFile, RemoteFile, local_file, safe_relpath
from .errors import ConflictError, RegistryDamagedError, RepoNotFoundError, RevisionNotFoundError, TagExistsError
from .registry_files import read_bounded

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_SHA = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHORT = re.compile(r"[0-9a-f]{5,39}")
_REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")
MAX_RECORD_BYTES = 64 << 20  # a commit record of a million files is about 200 MB: no adapter has that many
MAX_REF_BYTES = 4096  # a ref holds one sha
MAX_HISTORY = 100_000  # commits walked from a head


class RepoStore:
    """One repository directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- repository -------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "repo.json").is_file()

    @property
    def private(self) -> bool:
        doc = self._json(self.path / "repo.json", "repo.json")
        return bool(doc.get("private")) if isinstance(doc, dict) else False

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
            _write_atomic(self._ref_path("heads", DEFAULT_BRANCH), sha)
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
        """Where the object of that digest lies; a digest that is not 64 hex digits names no path."""
        if not _SHA256.fullmatch(sha256):
            raise RegistryDamagedError(f"{sha256[:80]!r} is not a sha256 digest", path=self.path)
        return self.path / "objects" / sha256

    def read_object(self, f: RemoteFile, limit: int) -> bytes:
        """A small file of a commit (a model card), bounded by its stated size and `limit`, hash-checked."""
        what = f"the object of {f.path!r}"
        data = read_bounded(self.blob(f.sha256 or ""), self.path, what, limit, f.size)
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise RegistryDamagedError(f"{what} does not match its sha256", path=self.blob(f.sha256 or ""))
        return data

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
            if ref is not None and (ref.exists() or ref.is_symlink()):
                return self._read_ref(ref)
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
            ref = self._ref_path("heads", name)
            if ref.exists():
                raise ConflictError(f"branch {name!r} already exists in {self.name}")
            _write_atomic(ref, sha)

    def create_tag(self, name: str, sha: str) -> None:
        """Tags are immutable: an existing name is refused even when it points at `sha`."""
        check_ref_name(name)
        with self.locked():
            ref = self._ref_path("tags", name)
            if ref.exists() or ref.is_symlink():
                raise TagExistsError(f"tag {name!r} already exists in {self.name}, on {self._read_ref(ref)[:12]}")
            _write_atomic(ref, sha)

    def delete_tag(self, name: str) -> str:
        """Remove a tag on purpose (`loractl tag --delete`, `push --force-tag`); returns the sha it named."""
        check_ref_name(name)
        with self.locked():
            ref = self._ref_path("tags", name)
            if not (ref.exists() or ref.is_symlink()):
                raise RevisionNotFoundError(f"no tag {name!r} in {self.name}")
            sha = self._read_ref(ref)
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
            _write_atomic(self._ref_path("heads", branch), sha)
            return sha

    def plant(self, branch: str, path: str, data: bytes) -> str:
        """Commit a file without checking its name: tests use it to build hostile repositories."""
        f = local_file(path, data=data)
        self.put(f)
        with self.locked():
            head = self._head(branch)
            sha = self._write_commit(head, {**self.tree(head), path: _entry(f)}, f"plant {path}", "")
            _write_atomic(self._ref_path("heads", branch), sha)
            return sha

    def tree(self, sha: str) -> dict[str, dict[str, Any]]:
        return dict(self._commit_doc(sha)["files"])

    def files(self, sha: str) -> dict[str, RemoteFile]:
        return {p: RemoteFile(p, e["size"], e["sha1"], e["sha256"]) for p, e in self.tree(sha).items()}

    def info(self, sha: str) -> Commit:
        doc = self._commit_doc(sha)
        try:
            date = datetime.strptime(doc["date"], DATE_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            raise RegistryDamagedError(
                f"commit {sha[:12]} has a date that is not one", path=self._commit_path(sha)
            ) from None
        return Commit(sha, date, doc["title"], doc["message"])

    def log(self, sha: str) -> Iterator[Commit]:
        """`sha` and its ancestors, newest first; a loop or a history deeper than `MAX_HISTORY` is refused."""
        seen: set[str] = set()
        current: str | None = sha
        while current:
            if current in seen or len(seen) >= MAX_HISTORY:
                why = "loops back to" if current in seen else f"goes deeper than {MAX_HISTORY:,} commits at"
                raise RegistryDamagedError(f"the history of {sha[:12]} {why} {current[:12]}", path=self.path)
            seen.add(current)
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
        if ref is None or not (ref.exists() or ref.is_symlink()):
            raise RevisionNotFoundError(f"no branch {branch!r} in {self.name}")
        return self._read_ref(ref)

    def _ref(self, kind: str, name: str) -> Path | None:
        """The file of ref `name`, or None for a name no ref can have (an absolute path, `..`, ...)."""
        try:
            check_ref_name(name)
        except UsageError:
            return None
        return self._ref_path(kind, name)

    def _ref_path(self, kind: str, name: str) -> Path:
        return self.path / "refs" / kind / name

    def _read_ref(self, ref: Path) -> str:
        """A ref's sha, read bounded; anything but a 40-hex sha is damage."""
        what = f"ref {ref.relative_to(self.path).as_posix()}"
        text = read_bounded(ref, self.path, what, MAX_REF_BYTES).decode("ascii", "replace").strip()
        if not _SHA.fullmatch(text):
            raise RegistryDamagedError(f"{what} holds {text[:60]!r}, not a commit sha", path=ref)
        return text

    def _refs(self, kind: str) -> dict[str, str]:
        self.require()
        base = self.path / "refs" / kind
        found = sorted(p for p in base.rglob("*") if p.is_symlink() or not p.is_dir())
        return {p.relative_to(base).as_posix(): self._read_ref(p) for p in found}

    def _commit_path(self, sha: str) -> Path:
        return self.path / "commits" / f"{sha}.json"

    def _commit_doc(self, sha: str) -> dict[str, Any]:
        """A commit record, checked: it hashes to `sha`, and every field is what `_write_commit` writes."""
        path = self._commit_path(sha)
        if not (_SHA.fullmatch(sha) and (path.exists() or path.is_symlink())):
            raise RevisionNotFoundError(f"no commit {sha!r} in {self.name}")
        raw = read_bounded(path, self.path, f"commit {sha[:12]}", MAX_RECORD_BYTES)
        if hashlib.sha1(raw).hexdigest() != sha:
            raise RegistryDamagedError(f"commit {sha[:12]} does not hash to its name", path=path)
        doc = _parse(raw, path)
        _check_commit(doc, path)
        return doc  # type: ignore[no-any-return]

    def _write_commit(self, parent: str | None, files: dict[str, Any], title: str, message: str) -> str:
        date = datetime.now(timezone.utc).strftime(DATE_FORMAT)
        doc = {"parent": parent, "date": date, "title": title, "message": message, "files": dict(sorted(files.items()))}
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        sha = hashlib.sha1(raw.encode()).hexdigest()
        _write_atomic(self.path / "commits" / f"{sha}.json", raw)
        return sha

    def _json(self, path: Path, what: str) -> Any:
        return _parse(read_bounded(path, self.path, what, MAX_REF_BYTES), path)


def check_ref_name(name: str) -> None:
    """Refuse branch and tag names git would refuse (and any that could escape `refs/`)."""
    if not _REF_NAME.fullmatch(name) or ".." in name or "//" in name or name.endswith(("/", ".lock")):
        raise UsageError(f"invalid branch or tag name {name!r}", hint="use letters, digits, '.', '_', '-' and '/'")


def _entry(f: LocalFile) -> dict[str, Any]:
    return {"size": f.size, "sha1": f.git_oid, "sha256": f.sha256}


def _parse(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise RegistryDamagedError("a record that is not JSON", path=path) from None


def _check_commit(doc: Any, path: Path) -> None:
    """Refuse a commit record whose fields are not what `_write_commit` writes (hashes as hex digests)."""

    def hex_of(value: Any, pattern: re.Pattern[str]) -> bool:
        return isinstance(value, str) and pattern.fullmatch(value) is not None

    fields_ok = (
        isinstance(doc, dict)
        and (doc.get("parent") is None or hex_of(doc.get("parent"), _SHA))
        and all(isinstance(doc.get(k), str) for k in ("date", "title", "message"))
        and isinstance(doc.get("files"), dict)
    )
    bad = None if fields_ok else "its fields are malformed"
    for name, entry in doc.get("files", {}).items() if fields_ok else ():
        size = entry.get("size") if isinstance(entry, dict) else None
        if not (
            isinstance(size, int)
            and not isinstance(size, bool)
            and size >= 0
            and hex_of(entry.get("sha1"), _SHA)
            and hex_of(entry.get("sha256"), _SHA256)
        ):
            bad = f"the entry of {name[:80]!r} is malformed (its size, sha1 and sha256 as hex digests)"
            break
    if bad:
        raise RegistryDamagedError(f"commit record: {bad}", path=path)


def _write_atomic(path: Path, content: str | bytes) -> None:
    """Write a record or object whole, or not at all: a failure (a full disk) leaves no temporary and names `path`."""
    with atomic_output(path, force=True, completes=False) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
