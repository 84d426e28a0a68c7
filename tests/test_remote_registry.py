"""push / pull / versions semantics, run against every registry: file://, the fake Hub (regular and LFS).

The Hub cases drive the real huggingface_hub client against tests/fakehub.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from loractl.errors import IntegrityError, OutputExistsError
from loractl.formats import describe_adapter, load_adapter
from loractl.remote import (
    ORIGIN_FILE,
    ConflictError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TagExistsError,
    UnsafePathError,
    pull,
    push,
    read_origin,
    versions,
)
from loractl.remote.transfer import _open  # the registry object, to pause a pusher between reading and committing
from loractl.remote.uri import parse_uri

if TYPE_CHECKING:
    from fakehub import Registry

pytest_plugins = ("fakehub",)  # the `registry` and `hub` fixtures

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "fixtures" / "adapters" / "tiny-qv"
V2 = ROOT / "fixtures" / "adapters" / "tiny-patterns"
REPO = "alice/lora"


def _same_files(pulled: Path, pushed: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (pushed / name).read_bytes(), name


def test_push_tag_push_pull_by_branch_tag_and_short_sha(registry: Registry, tmp_path: Path) -> None:
    first = push(V1, registry.uri(REPO), tag="v1", create=True, **registry.auth)
    second = push(V2, registry.uri(REPO), message="second version", **registry.auth)
    assert first.changed and second.changed and second.parent == first.sha != second.sha

    at_tag = pull(registry.uri(REPO, "v1"), tmp_path / "at-tag", **registry.auth)
    at_main = pull(registry.uri(REPO, "main"), tmp_path / "at-main", **registry.auth)
    at_short = pull(registry.uri(REPO, first.sha[:7]), tmp_path / "at-short", **registry.auth)
    assert (at_tag.sha, at_main.sha, at_short.sha) == (first.sha, second.sha, first.sha)
    _same_files(tmp_path / "at-tag", V1)
    _same_files(tmp_path / "at-main", V2)
    _same_files(tmp_path / "at-short", V1)
    for out in ("at-tag", "at-main"):
        assert not describe_adapter(tmp_path / out).errors  # what `validate` checks structurally
    assert at_main.content_hash == load_adapter(V2).content_hash()

    listed = versions(registry.uri(REPO), **registry.auth)
    shas = [v.sha for v in listed.versions]
    assert shas[:2] == [second.sha, first.sha]
    assert listed.tags == {"v1": first.sha}
    assert listed.versions[1].tags == ("v1",)
    assert [v.content_hash for v in listed.versions[:2]] == [second.content_hash, first.content_hash]
    assert listed.versions[0].title == "second version"


def test_the_tokenizer_saved_beside_an_adapter_travels_with_it(registry: Registry, tmp_path: Path) -> None:
    """An adapter that adds tokens is saved with its tokenizer (train, PEFT users): push sends it, pull brings it,
    and the content hash stays the adapter's own."""
    import shutil

    adapter = tmp_path / "with-tokenizer"
    shutil.copytree(V1, adapter)
    tokenizer = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for name in tokenizer:
        shutil.copy(ROOT / "fixtures" / "tiny-llama" / name, adapter / name)
    (adapter / "notes.txt").write_text("not the adapter's, not a tokenizer's")
    pushed = push(adapter, registry.uri(REPO), create=True, **registry.auth)
    assert set(tokenizer) <= set(pushed.files) and "notes.txt" not in pushed.files
    assert pushed.content_hash == load_adapter(V1).content_hash()
    pull(registry.uri(REPO), tmp_path / "out", **registry.auth)
    for name in tokenizer:
        assert (tmp_path / "out" / name).read_bytes() == (adapter / name).read_bytes(), name


def test_pull_records_the_resolved_commit(registry: Registry, tmp_path: Path) -> None:
    pushed = push(V1, registry.uri(REPO), tag="v1", create=True, **registry.auth)
    pull(registry.uri(REPO, "v1"), tmp_path / "out", **registry.auth)
    origin = read_origin(tmp_path / "out")
    assert origin is not None and (tmp_path / "out" / ORIGIN_FILE).is_file()
    assert origin["commit"] == pushed.sha and origin["revision"] == "v1"
    assert origin["content_hash"] == pushed.content_hash
    assert parse_uri(origin["source"]).repo_id == REPO


def test_unchanged_push_makes_no_commit(registry: Registry) -> None:
    first = push(V1, registry.uri(REPO), create=True, **registry.auth)
    again = push(V1, registry.uri(REPO), **registry.auth)
    assert not again.changed and again.sha == first.sha
    assert len(versions(registry.uri(REPO), **registry.auth).versions) == 2  # initial commit + one version


def test_tags_are_immutable(registry: Registry) -> None:
    first = push(V1, registry.uri(REPO), tag="v1", create=True, **registry.auth)
    same = push(V1, registry.uri(REPO), tag="v1", **registry.auth)  # same content, same commit: fine
    assert same.sha == first.sha and not same.changed
    with pytest.raises(TagExistsError):
        push(V2, registry.uri(REPO), tag="v1", **registry.auth)
    listed = versions(registry.uri(REPO), **registry.auth)
    assert listed.tags == {"v1": first.sha}
    assert listed.versions[0].sha == first.sha  # the refused push landed nothing


def test_concurrent_pushers_from_one_head(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both read the same head, then both commit: exactly one lands, the other gets ConflictError."""
    base = push(V1, registry.uri(REPO), create=True, **registry.auth)
    barrier = threading.Barrier(2, timeout=30)
    remotes = []

    def paused_open(uri, endpoint, token):  # type: ignore[no-untyped-def]
        remote = _open(uri, endpoint, token)
        real_commit = remote.commit

        def commit(*args, **kwargs):  # type: ignore[no-untyped-def]
            barrier.wait()
            return real_commit(*args, **kwargs)

        remote.commit = commit
        remotes.append(remote)
        return remote

    monkeypatch.setattr("loractl.remote.transfer._open", paused_open)
    results: list[object] = []

    def pusher(adapter: Path, message: str) -> None:
        try:
            results.append(push(adapter, registry.uri(REPO), message=message, **registry.auth))
        except ConflictError as e:
            results.append(e)

    threads = [
        threading.Thread(target=pusher, args=(V2, "a")),
        threading.Thread(target=pusher, args=(ROOT / "fixtures/adapters/tiny-dora", "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    landed = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, ConflictError)]
    assert len(landed) == 1 and len(refused) == 1
    history = versions(registry.uri(REPO), **registry.auth).versions
    assert [v.sha for v in history[:2]] == [landed[0].sha, base.sha]  # type: ignore[attr-defined]


def test_push_to_new_branch_and_stale_files_are_deleted(registry: Registry, tmp_path: Path) -> None:
    first = push(V1, registry.uri(REPO), create=True, **registry.auth)
    registry.store(REPO).plant("main", "old-notes.txt", b"from an earlier version")
    on_branch = push(V2, registry.uri(REPO), branch="feat/x", **registry.auth)
    assert on_branch.parent != first.sha  # main moved with the planted file; the branch starts there
    out = pull(registry.uri(REPO, "feat/x"), tmp_path / "out", **registry.auth)
    assert "old-notes.txt" not in out.files and "README.md" in out.files
    assert versions(registry.uri(REPO), **registry.auth).versions[0].title == "plant old-notes.txt"


def test_missing_repo_and_revision(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RepoNotFoundError):
        push(V1, registry.uri("alice/absent"), **registry.auth)
    with pytest.raises(RepoNotFoundError):
        pull(registry.uri("alice/absent"), tmp_path / "out", **registry.auth)
    push(V1, registry.uri(REPO), create=True, **registry.auth)
    with pytest.raises(RevisionNotFoundError):
        pull(registry.uri(REPO, "no-such-tag"), tmp_path / "out", **registry.auth)
    assert not (tmp_path / "out").exists()


def test_hostile_file_name_is_refused(registry: Registry, tmp_path: Path) -> None:
    push(V1, registry.uri(REPO), create=True, **registry.auth)
    registry.store(REPO).plant("main", "../../x", b"escape")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    with pytest.raises(UnsafePathError):
        pull(registry.uri(REPO), tmp_path / "deep" / "er" / "out", **registry.auth)
    assert not (tmp_path / "x").exists() and not (tmp_path / "deep" / "x").exists()
    assert list((tmp_path / "deep" / "er").iterdir()) == []


def test_pull_refuses_an_existing_output(registry: Registry, tmp_path: Path) -> None:
    push(V1, registry.uri(REPO), create=True, **registry.auth)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        pull(registry.uri(REPO), tmp_path / "out", **registry.auth)
    pull(registry.uri(REPO), tmp_path / "out", force=True, **registry.auth)
    _same_files(tmp_path / "out", V1)


def test_content_hash_mismatch_is_refused(registry: Registry, tmp_path: Path) -> None:
    """Files intact, but the card claims another adapter: loractl's own content-hash check refuses it."""
    pushed = push(V1, registry.uri(REPO), create=True, **registry.auth)
    card = (registry.store(REPO).blob(registry.store(REPO).files(pushed.sha)["README.md"].sha256 or "")).read_text()
    registry.store(REPO).plant("main", "README.md", card.replace(pushed.content_hash, "sha256:" + "0" * 64).encode())
    with pytest.raises(IntegrityError, match="recorded in its card"):
        pull(registry.uri(REPO), tmp_path / "out", **registry.auth)
    assert not (tmp_path / "out").exists()
