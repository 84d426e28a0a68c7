"""push, pull and versions over any `Remote`: the semantics both registries share.

A push reads the branch head once, compares files by hash, and lands at most one commit
whose parent is that head; a pull resolves to a full sha before it downloads, checks every
file against the registry's hashes and the adapter against its own content hash, and only
then renames the output into place.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, IntegrityError, UsageError
from ..io.atomic import atomic_output
from ..origin import ORIGIN_FILE
from .base import DEFAULT_BRANCH, LocalFile, Remote, Snapshot, check_file, local_file, safe_relpath
from .card import card_content_hash, model_card
from .errors import ConflictError, RegistryDamagedError, RevisionNotFoundError, TagExistsError, TransientError
from .registry_files import copy_exact
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PullResult:
    """Where a pull came from (the resolved sha) and what it wrote."""

    url: str
    revision: str
    sha: str
    out: Path
    files: tuple[str, ...]
    content_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def push(
    adapter: str | Path,
    repo: str | RemoteURI,
    *,
    branch: str | None = None,
    tag: str | None = None,
    force_tag: bool = False,
    message: str | None = None,
    private: bool = False,
    create: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
) -> PushResult:
    """Publish `adapter` (its files, the tokenizer saved beside it, a model card) as one commit on `branch`
    (default main), optionally tagged; no-op when unchanged.

    `format` and `read_options` say how to read the adapter (`--from`, `--allow-pickle`, ...).
    A tag that exists elsewhere is refused, unless `force_tag` moves it on purpose.
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
    if tag is not None and tag in tags and (changed or tags[tag] != head) and not force_tag:
        raise TagExistsError(
            f"tag {tag!r} already points at {tags[tag][:12]}",
            hint="tags do not move by accident: choose a new name, or pass --force-tag to move it",
        )
    sha = head
    if changed:
        title = message or f"loractl push {content_hash[:19]}"
        sha = _land(remote, branch, head, adds, deletes, title, f"content_hash: {content_hash}")
    if tag is not None and tags.get(tag) != sha:
        if tag in tags:
            remote.delete_tag(tag)  # only with force_tag (checked above)
        remote.create_tag(tag, sha)
    return PushResult(remote.url, branch, sha, head, changed, tag, content_hash, tuple(f.path for f in files))


@dataclass(frozen=True)
class TagResult:
    """What `tag` did: the tag, the commit it names now (None once deleted) and the one it named before."""

    url: str
    tag: str
    sha: str | None
    previous: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag(
    repo: str | RemoteURI,
    name: str,
    *,
    delete: bool = False,
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
) -> TagResult:
    """Create `name` on REPO's `@REV` (default main), move it (`force`), or delete it (`delete`).

    Tags stay immutable by default: creating one that exists is `TagExistsError` unless `force`.
    """
    uri = _uri(repo)
    remote = _open(uri, endpoint, token)
    previous = remote.refs().tags.get(name)
    if delete:
        if uri.revision:
            raise UsageError(
                "--delete takes no '@REV'", hint=f"loractl tag {replace(uri, revision=None)} {name} --delete"
            )
        if previous is None:
            raise RevisionNotFoundError(
                f"no tag {name!r} in {uri.repo_id}", hint=f"list them with 'loractl versions {repo}'"
            )
        remote.delete_tag(name)
        return TagResult(remote.url, name, None, previous)
    sha = remote.resolve(uri.revision or DEFAULT_BRANCH)
    if previous == sha:
        return TagResult(remote.url, name, sha, previous)
    if previous is not None:
        if not force:
            raise TagExistsError(
                f"tag {name!r} already points at {previous[:12]}",
                hint="tags do not move by accident: pass --force to move it, or --delete it first",
            )
        remote.delete_tag(name)
    remote.create_tag(name, sha)
    return TagResult(remote.url, name, sha, previous)


def pull(
    repo: str | RemoteURI,
    out: str | Path,
    *,
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    format: str | None = None,
    read_options: ReadOptions | None = None,
) -> PullResult:
    """Fetch one version into `out` (atomically), verified file by file and by content hash.

    `format` and `read_options` say how to read the pulled adapter for its content hash.
    `include`/`exclude` are glob patterns on the repository's paths: they pick one adapter out of
    a repository that holds several (`--include 'style-a/*'`); the selection must hold exactly one.
    """
    uri = _uri(repo)
    rev = revision or uri.revision or DEFAULT_BRANCH
    remote = _open(uri, endpoint, token)
    snap = remote.fetch(rev)
    names = _selected([p for p in snap.files if p not in _HOUSEKEEPING], include, exclude, f"{uri.repo_id}@{rev}")
    with atomic_output(out, force=force) as tmp:
        tmp.mkdir()
        for name in names:
            _copy_verified(snap, name, tmp / safe_relpath(name))
        root = _adapter_root(tmp, names, f"{uri.repo_id}@{rev}")
        content_hash = _verify_adapter(root, format, read_options)
        origin = {
            "source": str(replace(uri, revision=None)),
            "url": remote.url,
            "revision": rev,
            "commit": snap.sha,
            "content_hash": content_hash,
        }
        (root / ORIGIN_FILE).write_text(json.dumps(origin, indent=2, sort_keys=True) + "\n")
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
    """The adapter's files, the tokenizer saved beside it (new tokens, a chat template: what `merge` and `eval`
    read there), and its generated card; and its content hash."""
    from ..formats import describe_adapter, load_adapter
    from ..ops.merge_vocab import tokenizer_files

    info = describe_adapter(adapter, format=format, options=options)
    if info.errors:
        raise AdapterError(info.errors[0].render(), path=adapter, hint="run 'loractl validate' before pushing")
    recorded = info.record.content_hash if info.record else None
    content_hash = recorded or load_adapter(adapter, format=format, options=options).content_hash()
    paths = [*info.files, *(p for p in tokenizer_files(info.path) if p not in info.files)]
    files = [local_file(p.relative_to(info.path).as_posix(), p) for p in paths]
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
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".npz", ".gguf")


def _selected(names: list[str], include: Sequence[str], exclude: Sequence[str], where: str) -> tuple[str, ...]:
    """The paths `include` (any pattern; all paths when none) keeps and `exclude` (any pattern) does not drop."""
    kept = tuple(
        sorted(
            n
            for n in names
            if (not include or any(fnmatch(n, p) for p in include)) and not any(fnmatch(n, p) for p in exclude)
        )
    )
    if not names:
        raise UsageError(
            f"{where} holds no file to pull (only {', '.join(sorted(_HOUSEKEEPING))}: the repository's first commit?)",
            hint=f"pull a version 'loractl versions' lists with a content hash, e.g. {where.split('@')[0]}@main",
        )
    if not kept:
        raise UsageError(
            f"--include/--exclude select no file of {where}",
            hint="its files: " + ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else ""),
        )
    return kept


def _adapter_root(tmp: Path, names: tuple[str, ...], where: str) -> Path:
    """The one directory of the selection that holds adapter weights (the repository root, or a folder)."""
    roots = sorted({PurePosixPath(n).parent.as_posix() for n in names if n.endswith(_WEIGHT_SUFFIXES)})
    if len(roots) > 1:
        raise UsageError(
            f"{where} holds {len(roots)} adapters ({', '.join(r + '/' for r in roots)})",
            hint=f"pick one with --include, e.g. --include '{roots[-1]}/*'",
        )
    return tmp / roots[0] if roots else tmp


def _copy_verified(snap: Snapshot, name: str, dest: Path) -> None:
    """Copy one fetched file, never more bytes than its record states, and check it against the
    registry's hashes; a bad cached copy is evicted (pull again), a bad registry object is named."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected, source = snap.files[name], snap.sources[name]
    what = f"the object of {name!r} at {snap.sha[:12]}"
    try:
        copy_exact(source, snap.root, what, expected.size, dest)
        problem = check_file(dest, expected)
    except RegistryDamagedError as e:
        if not snap.disposable:
            raise
        problem = e.message
    if problem is None:
        return
    if snap.disposable:
        _evict(source)
        raise IntegrityError(f"{name} at {snap.sha[:12]}: {problem}", hint="the download was corrupted; pull again")
    raise RegistryDamagedError(f"{what}: {problem}", path=source)


def _evict(source: Path) -> None:
    target = source.resolve()
    source.unlink(missing_ok=True)
    target.unlink(missing_ok=True)


def _verify_adapter(root: Path, format: str | None, options: ReadOptions | None) -> str:
    """The adapter's content hash, checked against the hash its metadata and its card (beside it) record."""
    from ..formats import describe_adapter, load_adapter

    info = describe_adapter(root, format=format, options=options)
    if info.errors:
        raise AdapterError(info.errors[0].render(), hint="the pulled version does not validate")
    computed = load_adapter(root, format=format, options=options).content_hash()
    card = card_content_hash((root / CARD).read_text()) if (root / CARD).is_file() else None
    for where, recorded in (
        ("its metadata", info.record.content_hash if info.record else None),
        ("its card", card),
    ):
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
