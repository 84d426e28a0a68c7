"""Registries of versioned adapters: push, pull and list versions on the Hub or a `file://` directory.

push(adapter, "owner/name", tag="v1")            one version = one commit (+ an immutable tag)
pull("owner/name@v1", out)                        resolve → download → verify → write atomically
versions("file:///srv/registry/owner/name")       commits, tags, content hashes
"""

from __future__ import annotations

from ..origin import ORIGIN_FILE, read_origin
from .base import Commit, Refs, Remote, RemoteFile, Snapshot
from .errors import (
    AuthError,
    ConflictError,
    OfflineError,
    RegistryDamagedError,
    RemoteError,
    RemoteFileNotFoundError,
    RemoteURIError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TagExistsError,
    TransientError,
    UnsafePathError,
)
from .transfer import PullResult, PushResult, TagResult, Version, VersionList, pull, push, tag, versions
from .uri import RemoteURI, open_remote, parse_uri

__all__ = [
    "ORIGIN_FILE", "AuthError", "Commit", "ConflictError", "OfflineError", "PullResult", "PushResult", "Refs",
    "RegistryDamagedError",
    "Remote", "RemoteError", "RemoteFile", "RemoteFileNotFoundError", "RemoteURI", "RemoteURIError",
    "RepoNotFoundError", "RevisionNotFoundError", "Snapshot", "TagExistsError", "TagResult", "TransientError",
    "UnsafePathError", "Version", "VersionList", "open_remote", "parse_uri", "pull", "push", "read_origin", "tag",
    "versions",
]  # fmt: skip
