"""push, pull and versions over any `Remote`: the semantics both registries share.

A push reads the branch head once, compares files by hash, and lands at most one commit
whose parent is that head; a pull resolves to a full sha before it downloads, checks every
file against the registry's hashes and the adapter against its own content hash, and only
then renames the output into place.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError, IntegrityError, UsageError
from ..io.atomic import atomic_output
from ..origin import ORIGIN_FILE
from .base import DEFAULT_BRANCH, LocalFile, Remote, Snapshot, check_file, local_file, safe_relpath
from .card import card_content_hash, model_card
from .errors import ConflictError, RevisionNotFoundError, TagExistsError, TransientError
from .retry import DELAYS
from .uri import RemoteURI, open_remote, parse_uri

if TYPE_CHECKING:
    from ..formats.options import ReadOptions

CARD = "README.md"
_HOUSEKEEPING = {".gitattributes"}
_PUSH_ID = "loractl-push-id: "


@dataclass(frozen=True)
class PushResult:
    """What a push did: the commit it landed (or the unchanged head) and the tag it made."""

    url: str
    branch: str
    sha: str
    parent: str
    changed: bool
    tag: str | None
    content_hash: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class PullResult:
    """Where a pull came from (the resolved sha) and what it wrote."""

    url: str
    revision: str
    sha: str
    out: Path
    files: tuple[str, ...]
    content_hash: str


@dataclass(frozen=True)
class Version:
    """One commit of a branch, with its tags and the content hash its card records."""

    sha: str
    date: datetime | None
    title: str
    tags: tuple[str, ...]
    content_hash: str | None


@dataclass(frozen=True)
class VersionList:
    url: str
    branch: str
    versions: tuple[Version, ...]
    tags: dict[str, str]


def push(
    adapter: str | Path,
    repo: str | RemoteURI,
    *,
    branch: str | None = None,
    tag: str | None = None,
    message: str | None = None,
    private: bool = False,
    create: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
) -> PushResult:
    """Publish `adapter` as one commit on `branch` (default main), optionally tagged; no-op when unchanged.

    `format` and `read_options` say how to read the adapter (`--from`, `--allow-pickle`, ...).
    """
    uri = _uri(repo)
    if uri.revision:
        raise UsageError(f"push takes --branch, not '@{uri.revision}' in the repository name")
    files, content_hash = _artifact(Path(adapter), uri.repo_id, format, read_options)
    remote = _open(uri, endpoint, token)
    if create:
        remote.create(private=private)
    branch = branch or DEFAULT_BRANCH
    head, tags = _head(remote, branch)
    current = remote.files(head)
    adds = [f for f in files if not (f.path in current and f.same_as(current[f.path]))]
    deletes = sorted(set(current) - {f.path for f in files} - _HOUSEKEEPING)
    changed = bool(adds or deletes)
    if tag is not None and tag in tags and (changed or tags[tag] != head):
        raise TagExistsError(
            f"tag {tag!r} already points at {tags[tag][:12]}", hint="tags are immutable; choose a new name"
        )
    sha = head
    if changed:
        title = message or f"loractl push {content_hash[:19]}"
        sha = _land(remote, branch, head, adds, deletes, title, f"content_hash: {content_hash}")
    if tag is not None and tags.get(tag) != sha:
        remote.create_tag(tag, sha)
    return PushResult(remote.url, branch, sha, head, changed, tag, content_hash, tuple(f.path for f in files))


def pull(
    repo: str | RemoteURI,
    out: str | Path,
    *,
    revision: str | None = None,
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
) -> PullResult:
    """Fetch one version into `out` (atomically), verified file by file and by content hash.

    `format` and `read_options` say how to read the pulled adapter for its content hash.
    """
    uri = _uri(repo)
    rev = revision or uri.revision or DEFAULT_BRANCH
    remote = _open(uri, endpoint, token)
    snap = remote.fetch(rev)
    names = tuple(sorted(p for p in snap.files if p not in _HOUSEKEEPING))
    with atomic_output(out, force=force) as tmp:
        tmp.mkdir()
        for name in names:
            _copy_verified(snap, name, tmp / safe_relpath(name))
        content_hash = _verify_adapter(tmp, format, read_options)
        origin = {
            "source": str(replace(uri, revision=None)),
            "url": remote.url,
            "revision": rev,
            "commit": snap.sha,
            "content_hash": content_hash,
        }
        (tmp / ORIGIN_FILE).write_text(json.dumps(origin, indent=2, sort_keys=True) + "\n")
    return PullResult(remote.url, rev, snap.sha, Path(out), names, content_hash)


def versions(
    repo: str | RemoteURI, *, branch: str | None = None, endpoint: str | None = None, token: str | None = None
) -> VersionList:
    """The branch's commits (newest first) with tags and recorded content hashes, plus every tag."""
    uri = _uri(repo)
    remote = _open(uri, endpoint, token)
    branch = branch or uri.revision or DEFAULT_BRANCH
    tags = remote.refs().tags
    by_sha: dict[str, list[str]] = {}
    for name, sha in sorted(tags.items()):
        by_sha.setdefault(sha, []).append(name)
    found = [
        Version(c.sha, c.date, c.title, tuple(by_sha.get(c.sha, ())), card_content_hash(remote.read_text(c.sha, CARD)))
        for c in remote.commits(branch)
    ]
    return VersionList(remote.url, branch, tuple(found), tags)


# -- push ----------------------------------------------------------------------------------------
def _artifact(
    adapter: Path, repo_id: str, format: str | None, options: ReadOptions | None
) -> tuple[list[LocalFile], str]:
    """The adapter's files plus its generated card, and its content hash."""
    from ..formats import describe_adapter, load_adapter

    info = describe_adapter(adapter, format=format, options=options)
    if info.errors:
        raise AdapterError(info.errors[0].render(), path=adapter, hint="run 'loractl validate' before pushing")
    recorded = info.record.content_hash if info.record else None
    content_hash = recorded or load_adapter(adapter, format=format, options=options).content_hash()
    files = [local_file(p.relative_to(info.path).as_posix(), p) for p in info.files]
    return [*files, local_file(CARD, data=model_card(info, repo_id, content_hash).encode())], content_hash


def _head(remote: Remote, branch: str) -> tuple[str, dict[str, str]]:
    """The branch head (creating the branch from main's head when it is new) and the tags."""
    refs = remote.refs()
    if branch in refs.branches:
        return refs.branches[branch], refs.tags
    if DEFAULT_BRANCH not in refs.branches:
        raise RevisionNotFoundError(f"the repository has no {DEFAULT_BRANCH!r} branch to start {branch!r} from")
    remote.create_branch(branch, refs.branches[DEFAULT_BRANCH])
    return refs.branches[DEFAULT_BRANCH], refs.tags


def _land(
    remote: Remote, branch: str, parent: str, adds: list[LocalFile], deletes: list[str], title: str, description: str
) -> str:
    """One commit with `parent` as its parent; after a transient failure, find it or retry it, never duplicate."""
    push_id = secrets.token_hex(8)
    description = f"{description}\n{_PUSH_ID}{push_id}"
    for delay in (*DELAYS, None):
        try:
            return remote.commit(branch, parent, adds, deletes, title, description)
        except TransientError:
            landed = _landed(remote, branch, parent, push_id)
            if landed is not None or delay is None:
                if landed is None:
                    raise
                return landed
            time.sleep(delay)
    raise AssertionError("unreachable")


def _landed(remote: Remote, branch: str, parent: str, push_id: str) -> str | None:
    """The commit a failed-looking push landed, None if the branch is untouched, `ConflictError` otherwise."""
    head = remote.refs().branches.get(branch)
    if head == parent:
        return None
    for c in remote.commits(branch):
        if c.sha == parent:
            break
        if f"{_PUSH_ID}{push_id}" in c.message:
            return c.sha
    raise ConflictError(f"branch {branch!r} moved while pushing; nothing was overwritten", hint="push again")


# -- pull ----------------------------------------------------------------------------------------
def _copy_verified(snap: Snapshot, name: str, dest: Path) -> None:
    """Copy one fetched file and check it against the registry's hashes; a bad cached copy is evicted."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(snap.sources[name], dest)
    problem = check_file(dest, snap.files[name])
    if problem is None:
        return
    if snap.disposable:
        _evict(snap.sources[name])
    raise IntegrityError(f"{name} at {snap.sha[:12]}: {problem}", hint="the download was corrupted; pull again")


def _evict(source: Path) -> None:
    target = source.resolve()
    source.unlink(missing_ok=True)
    target.unlink(missing_ok=True)


def _verify_adapter(root: Path, format: str | None, options: ReadOptions | None) -> str:
    """The adapter's content hash, checked against the hash its metadata and its card record."""
    from ..formats import describe_adapter, load_adapter

    info = describe_adapter(root, format=format, options=options)
    if info.errors:
        raise AdapterError(info.errors[0].render(), hint="the pulled version does not validate")
    computed = load_adapter(root, format=format, options=options).content_hash()
    card = card_content_hash((root / CARD).read_text()) if (root / CARD).is_file() else None
    for where, recorded in (("its metadata", info.record.content_hash if info.record else None), ("its card", card)):
        if recorded is not None and recorded != computed:
            raise IntegrityError(
                f"content hash {computed} differs from {recorded} recorded in {where}",
                hint="the pushed version is damaged; pull another revision",
            )
    return computed


def _uri(repo: str | RemoteURI) -> RemoteURI:
    return parse_uri(repo) if isinstance(repo, str) else repo


def _open(uri: RemoteURI, endpoint: str | None, token: str | None) -> Remote:
    return open_remote(uri, endpoint=endpoint, token=token)
