"""Hub-only behaviour through the real huggingface_hub client: auth, faults, both upload paths, offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from loractl.errors import IntegrityError
from loractl.remote import (
    AuthError,
    OfflineError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    TransientError,
    pull,
    push,
    versions,
)

if TYPE_CHECKING:
    from fakehub import FakeHub

pytest_plugins = ("fakehub",)  # the `hub` fixture: regular and LFS upload modes

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "fixtures" / "adapters" / "tiny-qv"
V2 = ROOT / "fixtures" / "adapters" / "tiny-patterns"
REPO = "alice/lora"
ALICE = "tok-alice"
WEIGHTS = "adapter_model.safetensors"


def _push(hub: FakeHub, adapter: Path = V1, **kw: object) -> str:
    kw = {"token": ALICE, "create": True, **kw}
    return push(adapter, f"hf://{REPO}", endpoint=hub.endpoint, **kw).sha  # type: ignore[arg-type]


def _pull(hub: FakeHub, out: Path, rev: str = "main", token: str | None = ALICE) -> str:
    return pull(f"hf://{REPO}@{rev}", out, endpoint=hub.endpoint, token=token).sha


def test_upload_path_follows_the_server(hub: FakeHub, tmp_path: Path) -> None:
    _push(hub)
    uploads = hub.count("PUT", r"^/_lfs/upload/")
    assert uploads == (1 if hub.upload_mode == "lfs" else 0)  # the safetensors file went through git-LFS
    _pull(hub, tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == (V1 / WEIGHTS).read_bytes()


def test_bad_token_and_not_logged_in(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="rejected the token"):
        _push(hub, token="tok-stolen")
    with pytest.raises(AuthError, match="not logged in"):
        _push(hub, token=None)
    _push(hub)
    with pytest.raises(AuthError, match="may not write"):
        _push(hub, V2, token="tok-bob", create=False)
    with pytest.raises(AuthError):
        _pull(hub, tmp_path / "out", token="tok-stolen")


def test_private_repo_without_token(hub: FakeHub, tmp_path: Path) -> None:
    _push(hub, private=True)
    with pytest.raises(RepoNotFoundError, match="no token was sent") as anonymous:
        _pull(hub, tmp_path / "out", token=None)
    assert "HF_TOKEN" in (anonymous.value.hint or "")
    with pytest.raises(RepoNotFoundError):
        _pull(hub, tmp_path / "out", token="tok-bob")
    _pull(hub, tmp_path / "out")
    assert not describe_errors(tmp_path / "out")


def describe_errors(path: Path) -> list[object]:
    from loractl.formats import describe_adapter

    return list(describe_adapter(path).errors)


def test_missing_file_on_the_server(hub: FakeHub, tmp_path: Path) -> None:
    _push(hub)
    hub.fail("HEAD", rf"/resolve/.*/{WEIGHTS}$", status=404, code="EntryNotFound")
    with pytest.raises(RemoteFileNotFoundError):
        _pull(hub, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_server_error_once_is_retried(hub: FakeHub, tmp_path: Path) -> None:
    sha = _push(hub)
    hub.fail("GET", r"/revision/", status=500, times=1)
    assert _pull(hub, tmp_path / "out") == sha
    assert hub.count("GET", r"/revision/") == 2


def test_server_error_every_time_is_a_clear_error(hub: FakeHub, tmp_path: Path) -> None:
    _push(hub)
    hub.fail("GET", r"/revision/", status=500, times=-1)
    with pytest.raises(TransientError, match="HTTP 500") as failed:
        _pull(hub, tmp_path / "out")
    assert "retries" in (failed.value.hint or "")
    assert not (tmp_path / "out").exists()


def test_commit_response_lost_does_not_duplicate(hub: FakeHub) -> None:
    first = _push(hub)
    hub.fail("POST", r"/commit/main$", status=500, action="lost")  # landed, but the client sees a 500
    second = _push(hub, V2)
    history = versions(f"hf://{REPO}", endpoint=hub.endpoint, token=ALICE).versions
    assert [v.sha for v in history[:2]] == [second, first] and len(history) == 3


def test_commit_failing_once_is_retried(hub: FakeHub) -> None:
    first = _push(hub)
    hub.fail("POST", r"/commit/main$", status=503)
    second = _push(hub, V2)
    history = versions(f"hf://{REPO}", endpoint=hub.endpoint, token=ALICE).versions
    assert [v.sha for v in history[:2]] == [second, first] and len(history) == 3


def test_download_cut_once_recovers(hub: FakeHub, tmp_path: Path) -> None:
    _push(hub)
    hub.fail("GET", rf"/resolve/.*/{WEIGHTS}$", action="cut", times=1)
    _pull(hub, tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == (V1 / WEIGHTS).read_bytes()


def test_download_cut_every_time_fails_cleanly(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
    _push(hub)
    hub.fail("GET", rf"/resolve/.*/{WEIGHTS}$", action="cut", times=-1)
    with pytest.raises(TransientError):
        _pull(hub, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupted_download_of_the_right_size_is_caught(hub: FakeHub, tmp_path: Path) -> None:
    _push(hub)
    hub.fail("GET", rf"/resolve/.*/{WEIGHTS}$", action="corrupt", times=1)
    with pytest.raises(IntegrityError, match=WEIGHTS):
        _pull(hub, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _pull(hub, tmp_path / "out")  # the bad cached copy was evicted: a second pull fetches good bytes
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == (V1 / WEIGHTS).read_bytes()


def test_offline_pull_of_a_cached_commit(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import constants

    sha = _push(hub, tag="v1")
    _pull(hub, tmp_path / "online", rev="v1")
    hub.stop()  # the registry is gone
    assert _pull(hub, tmp_path / "by-tag", rev="v1") == sha
    assert _pull(hub, tmp_path / "by-sha", rev=sha) == sha
    with pytest.raises(OfflineError):
        _pull(hub, tmp_path / "never", rev="main")
    for out in ("by-tag", "by-sha"):
        assert (tmp_path / out / WEIGHTS).read_bytes() == (V1 / WEIGHTS).read_bytes()
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    assert _pull(hub, tmp_path / "offline-mode", rev="v1") == sha
