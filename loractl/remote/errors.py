"""Remote failures, one class per cause, so the CLI (and callers) branch on type, never on text."""

from __future__ import annotations

from ..errors import LoractlError, UsageError


class RemoteError(LoractlError):
    """Base class of everything a registry can refuse or fail at."""


class RemoteURIError(UsageError):
    """A REPO argument that names no registry loractl knows."""


class AuthError(RemoteError):
    """Not logged in, a rejected token, or a token without the needed permission."""


class RepoNotFoundError(RemoteError):
    """The repository does not exist (or is private and the token cannot see it)."""


class RevisionNotFoundError(RemoteError):
    """No branch, tag or commit of that name."""


class RemoteFileNotFoundError(RemoteError):
    """A file the commit lists could not be fetched."""


class ConflictError(RemoteError):
    """Someone else moved the branch since this push read it; nothing was overwritten."""


class TagExistsError(ConflictError):
    """Tags are immutable: the name already points at another commit."""


class TransientError(RemoteError):
    """A server or network failure that persisted through the retries."""


class OfflineError(RemoteError):
    """The registry is unreachable (or offline mode is on) and nothing usable is cached."""


class UnsafePathError(RemoteError):
    """A repository file name that would land outside the output directory."""
