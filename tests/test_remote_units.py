"""The small pieces: REPO parsing, file-name safety, ref names, the model card's recorded hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loractl.errors import UsageError
from loractl.formats import describe_adapter
from loractl.remote import RemoteURIError, UnsafePathError, parse_uri, push
from loractl.remote.base import local_file, safe_relpath
from loractl.remote.card import card_content_hash, model_card
from loractl.remote.store import RepoStore

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "fixtures" / "adapters" / "tiny-qv"


@pytest.mark.parametrize(
    ("text", "scheme", "repo_id", "revision", "root"),
    [
        ("alice/lora", "hf", "alice/lora", None, None),
        ("hf://alice/lora@v1", "hf", "alice/lora", "v1", None),
        ("hf://alice/lora@feat%2Fx", "hf", "alice/lora", "feat/x", None),
        ("alice/lora@3f2a9c1", "hf", "alice/lora", "3f2a9c1", None),
        ("file:///srv/reg/alice/lora", "file", "alice/lora", None, Path("/srv/reg")),
        ("file:///srv/my%20reg/alice/lora@main", "file", "alice/lora", "main", Path("/srv/my reg")),
    ],
)
def test_parse_uri(text: str, scheme: str, repo_id: str, revision: str | None, root: Path | None) -> None:
    uri = parse_uri(text)
    assert (uri.scheme, uri.repo_id, uri.revision, uri.root) == (scheme, repo_id, revision, root)


@pytest.mark.parametrize("text", ["lora", "a/b/c", "s3://a/b", "file://rel/a/b", "file:///a/b", "a/b@", "../a/b"])
def test_parse_uri_refuses(text: str) -> None:
    with pytest.raises(RemoteURIError):
        parse_uri(text)


@pytest.mark.parametrize("name", ["../x", "../../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a\\..\\x", "", "a/"])
def test_unsafe_names(name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(name)


@given(st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True), min_size=1, max_size=4))
def test_safe_names_stay_inside(parts: list[str]) -> None:
    name = "/".join(parts)
    if any(p in (".", "..") for p in parts):
        return
    root = Path("/out")
    assert (root / safe_relpath(name)).resolve().is_relative_to(root)


def test_git_blob_sha1_matches_git() -> None:
    assert local_file("x", data=b"hello\n").git_oid == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_card_records_the_content_hash_and_hub_metadata() -> None:
    info = describe_adapter(V1)
    card = model_card(info, "alice/lora", "sha256:" + "ab" * 32)
    assert card_content_hash(card) == "sha256:" + "ab" * 32
    front = card.split("---\n")[1]
    assert "base_model_relation: adapter" in front and "library_name: peft" in front and "- loractl" in front
    assert card_content_hash("# no front matter\n") is None and card_content_hash(None) is None
    assert model_card(info, "alice/lora", "sha256:1") == model_card(info, "alice/lora", "sha256:1")  # no clock


def test_store_refuses_ref_names_that_escape(tmp_path: Path) -> None:
    store = RepoStore(tmp_path / "alice" / "lora")
    store.create(private=False)
    head = store.resolve("main")
    for bad in ("../x", "a/../../b", "/abs", "x.lock"):
        with pytest.raises(UsageError):
            store.create_tag(bad, head)
    assert store.tags() == {}


def test_push_refuses_a_revision_in_the_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--branch"):
        push(V1, f"file://{tmp_path}/alice/lora@dev", create=True)
