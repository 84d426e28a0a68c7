"""Remote failures, one class per cause, so the CLI (and callers) branch on type, never on text."""

from __future__ import annotations

from ..errors import LoractlError, UsageError


class RemoteError(LoractlError):
    """Base class of everything a registry can refuse or fail at."""

    default_hint = "try again; 'loractl --debug …' shows the registry's answer"


class RemoteURIError(UsageError):
    """A REPO argument that names no registry loractl knows."""


class AuthError(RemoteError):
    """Not logged in, a rejected token, or a token without the needed permission."""


class RepoNotFoundError(RemoteError):
    """The repository does not exist (or is private and the token cannot see it)."""


class RevisionNotFoundError(RemoteError):
    """No branch, tag or commit of that name."""

    default_hint = "'loractl versions REPO' lists them"


class RemoteFileNotFoundError(RemoteError):
    """A file the commit lists could not be fetched."""

    default_hint = "the registry lost a file of this commit: pull another version, or push this one again"


class RegistryDamagedError(RemoteError):
    """The registry itself is damaged or hostile: a record that is not what loractl writes, an object
    that is a link out, a special file, or not the size its record states; nothing was written."""

    default_hint = "the registry is damaged: restore it from a backup, or push this version again"


class ConflictError(RemoteError):
    """Someone else moved the branch since this push read it; nothing was overwritten."""

    default_hint = "someone else pushed meanwhile: look at 'loractl versions REPO', then push again"


class TagExistsError(ConflictError):
    """Tags are immutable: the name already points at another commit."""

    default_hint = "tags do not move by accident: choose another name"


class TransientError(RemoteError):
    """A server or network failure that persisted through the retries."""

    default_hint = "the registry kept failing after retries; try again later"


class OfflineError(RemoteError):
    """The registry is unreachable (or offline mode is on) and nothing usable is cached."""


class UnsafePathError(RemoteError):
    """A repository file name that would land outside the output directory."""
