"""`huggingface_hub` exceptions → loractl's remote errors, by exception type and HTTP status.

Never by message text: the Hub's texts change (the 412 wording already did once).
"""

from __future__ import annotations

from .errors import (
    AuthError,
    ConflictError,
    OfflineError,
    RemoteError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TagExistsError,
    TransientError,
)

_LOGIN_HINT = "pass --token, set HF_TOKEN, or run 'hf auth login'"
_TRANSIENT = {408, 429, 500, 502, 503, 504}


def translate(e: Exception, repo_id: str, token: str | None, *, tag: str | None = None) -> RemoteError | None:
    """The loractl error for `e`, or None when `e` is not a registry failure (then it is a bug)."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(e, (hf.OfflineModeIsEnabled, httpx2.ConnectError)):
        return OfflineError(
            f"cannot reach the registry for {repo_id} ({type(e).__name__})",
            hint="check the network or HF_ENDPOINT; cached commits can still be pulled",
        )
    if isinstance(e, (hf.RevisionResolutionError, hf.LocalEntryNotFoundError)):
        return OfflineError(f"{repo_id}: not reachable and not in the local cache", hint="pull it once while online")
    if isinstance(e, hf.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"{repo_id} has no branch, tag or commit by that name", hint=f"list them with 'loractl versions {repo_id}'"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return _repo_not_found(repo_id, token)
    if isinstance(e, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)):
        return RemoteFileNotFoundError(f"{repo_id}: a file the commit lists is missing on the registry")
    if isinstance(e, hf.LocalTokenNotFoundError):
        return AuthError("not logged in to the Hub", hint=_LOGIN_HINT)
    if isinstance(e, hf.HfHubHTTPError) and e.response is not None:
        return _by_status(e.response.status_code, repo_id, token, tag)
    if isinstance(e, httpx2.TransportError):
        return TransientError(f"network failure talking to the registry for {repo_id} ({type(e).__name__})")
    return None


def _by_status(status: int, repo_id: str, token: str | None, tag: str | None) -> RemoteError:
    if status == 401:
        return _unauthorized(repo_id, token)
    if status == 403:
        return AuthError(
            f"the token may not write to {repo_id}", hint="use a token with write access to that namespace"
        )
    if status == 404:
        return _repo_not_found(repo_id, token)
    if status == 409 and tag is not None:
        return TagExistsError(
            f"tag {tag!r} already exists in {repo_id}",
            hint="tags do not move by accident: choose a new name, or move it with --force-tag",
        )
    if status in (409, 412):
        return ConflictError(
            f"{repo_id} changed while pushing (HTTP {status}); nothing was overwritten",
            hint="someone else pushed to this branch: pull or inspect it, then push again",
        )
    if status in _TRANSIENT:
        return TransientError(f"the registry failed for {repo_id} (HTTP {status})")
    return RemoteError(f"the registry refused the request for {repo_id} (HTTP {status})")


def _unauthorized(repo_id: str, token: str | None) -> AuthError:
    if _has_token(token):
        return AuthError(
            f"the registry rejected the token (while accessing {repo_id})",
            hint="the token is invalid or expired: " + _LOGIN_HINT,
        )
    return AuthError(f"not logged in (needed for {repo_id})", hint=_LOGIN_HINT)


def _repo_not_found(repo_id: str, token: str | None) -> RepoNotFoundError:
    if _has_token(token):
        return RepoNotFoundError(
            f"repository {repo_id} not found", hint="check the name; push with --create to make it"
        )
    return RepoNotFoundError(
        f"repository {repo_id} not found (or private: no token was sent)",
        hint=f"check the name; if it is private, {_LOGIN_HINT}",
    )


def _has_token(token: str | None) -> bool:
    from huggingface_hub import get_token

    return token is not None or get_token() is not None
