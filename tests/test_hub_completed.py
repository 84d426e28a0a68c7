"""The registry features beyond push/pull/versions: moving and deleting tags on purpose, picking one
adapter out of a repository, ISO-8601 times, resumed downloads, and four pushers at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import random_module, run_cli

import loractl
from loractl.adapter import Adapter, AdapterMeta
from loractl.errors import UsageError
from loractl.remote import RevisionNotFoundError, TagExistsError, pull, push, tag, versions
from loractl.remote.base import local_file

if TYPE_CHECKING:
    from fakehub import FakeHub, Registry

pytest_plugins = ("fakehub",)

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "fixtures" / "adapters" / "tiny-qv"
V2 = ROOT / "fixtures" / "adapters" / "tiny-patterns"
REPO = "alice/lora"


def _auth_args(registry: Registry) -> list[str]:
    return ["--token", "tok-alice", "--endpoint", registry.hub.endpoint] if registry.hub else []


def test_push_force_tag_moves_a_tag_only_when_asked(registry: Registry) -> None:
    first = push(V1, registry.uri(REPO), tag="v1", create=True, **registry.auth)
    with pytest.raises(TagExistsError, match="already points at") as refused:
        push(V2, registry.uri(REPO), tag="v1", **registry.auth)
    assert "--force-tag" in (refused.value.hint or "")
    listing = versions(registry.uri(REPO), **registry.auth)
    assert listing.tags["v1"] == first.sha and listing.versions[0].sha == first.sha  # refused before landing
    moved = push(V2, registry.uri(REPO), tag="v1", force_tag=True, **registry.auth)
    listing = versions(registry.uri(REPO), **registry.auth)
    assert listing.tags["v1"] == moved.sha != first.sha and [v.sha for v in listing.versions[:2]] == [
        moved.sha,
        first.sha,
    ]


def test_tag_command_creates_moves_and_deletes(registry: Registry) -> None:
    first = push(V1, registry.uri(REPO), create=True, **registry.auth)
    second = push(V2, registry.uri(REPO), **registry.auth)
    auth = _auth_args(registry)
    code, out, err = run_cli("tag", registry.uri(REPO, first.sha[:12]), "v1", *auth)
    assert code == 0, err
    assert versions(registry.uri(REPO), **registry.auth).tags == {"v1": first.sha}
    code, _, err = run_cli("tag", registry.uri(REPO), "v1", *auth)
    assert code == 1 and "already points at" in err and "--force" in err
    code, out, err = run_cli("tag", registry.uri(REPO), "v1", "--force", "--json", *auth)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "loractl/tag/1" and (doc["sha"], doc["previous"]) == (second.sha, first.sha)
    code, out, err = run_cli("tag", registry.uri(REPO), "v1", "--delete", *auth)
    assert code == 0 and "deleted tag v1" in out, err
    assert versions(registry.uri(REPO), **registry.auth).tags == {}
    with pytest.raises(RevisionNotFoundError):
        tag(registry.uri(REPO), "v1", delete=True, **registry.auth)


def _two_adapter_repo(registry: Registry) -> None:
    """One commit holding two adapters in folders a/ and b/ (a repository of styles, say)."""
    push(V1, registry.uri(REPO), create=True, **registry.auth)
    store = registry.store(REPO)
    files = [local_file(f"a/{p.name}", p) for p in V1.iterdir()] + [local_file(f"b/{p.name}", p) for p in V2.iterdir()]
    store.commit("main", None, files, ["README.md", *[p.name for p in V1.iterdir()]], "two adapters", "")


def test_pull_include_and_exclude_pick_one_adapter(registry: Registry, tmp_path: Path) -> None:
    _two_adapter_repo(registry)
    with pytest.raises(UsageError, match="holds 2 adapters") as both:
        pull(registry.uri(REPO), tmp_path / "all", **registry.auth)
    assert "--include" in (both.value.hint or "") and not (tmp_path / "all").exists()
    got = pull(registry.uri(REPO), tmp_path / "a", include=["a/*"], **registry.auth)
    assert got.files == tuple(sorted(f"a/{p.name}" for p in V1.iterdir()))
    assert got.content_hash == loractl.load_adapter(V1).content_hash()
    report = loractl.inspect_adapter(tmp_path / "a" / "a")
    assert report.origin is not None and report.origin["content_hash"] == got.content_hash
    code, _, err = run_cli("pull", registry.uri(REPO), "-o", tmp_path / "b", "--exclude", "a/*", *_auth_args(registry))
    assert code == 0, err
    assert loractl.load_adapter(tmp_path / "b" / "b").content_hash() == loractl.load_adapter(V2).content_hash()
    with pytest.raises(UsageError, match="select no file"):
        pull(registry.uri(REPO), tmp_path / "none", include=["c/*"], **registry.auth)


def test_versions_json_times_are_iso_8601(registry: Registry) -> None:
    push(V1, registry.uri(REPO), create=True, **registry.auth)
    code, out, err = run_cli("versions", registry.uri(REPO), "--json", *_auth_args(registry))
    assert code == 0, err
    date = json.loads(out)["versions"][0]["date"]
    parsed = datetime.fromisoformat(date)
    assert "T" in date and parsed.utcoffset() is not None and parsed.tzinfo is not None


def test_a_cut_download_above_the_resume_threshold_resumes(hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub resumes with `Range` only after its first 10 MiB chunk: the weights here are 24 MiB."""
    modules = {f"layers.{i}.proj": random_module(1024, 1024, 256, seed=i) for i in range(12)}
    loractl.save_adapter(Adapter(modules=modules, meta=AdapterMeta(base_model="big")), tmp_path / "big")
    weights = tmp_path / "big" / "adapter_model.safetensors"
    assert weights.stat().st_size > 24 * 2**20
    push(tmp_path / "big", f"hf://{REPO}", create=True, token="tok-alice", endpoint=hub.endpoint)
    hub.fail("GET", r"/resolve/.*/adapter_model\.safetensors$", action="cut", times=1)
    pull(f"hf://{REPO}", tmp_path / "out", token="tok-alice", endpoint=hub.endpoint)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == weights.read_bytes()
    resumed = [start for path, start in hub.ranges if path == "adapter_model.safetensors"]
    assert resumed and all(10 * 2**20 <= s < weights.stat().st_size for s in resumed)  # resumed, not restarted


@pytest.mark.parametrize(
    "registry",
    ["file", pytest.param("hf-regular", marks=pytest.mark.slow), pytest.param("hf-lfs", marks=pytest.mark.slow)],
    indirect=True,
)  # ~25 s each against the fake Hub (four client processes importing huggingface_hub, retried)
def test_four_processes_pushing_at_once_lose_no_version(registry: Registry, tmp_path: Path) -> None:
    """Each push lands as its own commit or fails with the conflict error; a retry lands it."""
    base = push(V1, registry.uri(REPO), create=True, **registry.auth)
    adapters = []
    for k in range(4):
        modules = {f"model.layers.{i}.self_attn.q_proj": random_module(64, 64, 2, seed=100 * k + i) for i in range(2)}
        loractl.save_adapter(Adapter(modules=modules, meta=AdapterMeta(base_model="tiny")), tmp_path / f"a{k}")
        adapters.append(tmp_path / f"a{k}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if registry.hub:
        env |= {"HF_ENDPOINT": registry.hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "cache")}
        env |= {"HF_HUB_DISABLE_XET": "1"} if registry.kind == "hf-lfs" else {}

    def start(path: Path) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "loractl", "push", str(path), registry.uri(REPO), *_auth_args(registry)]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    running = {path: start(path) for path in adapters}
    attempts = dict.fromkeys(adapters, 1)
    while running:
        path, proc = next(iter(running.items()))
        _, err = proc.communicate(timeout=120)
        del running[path]
        if proc.returncode != 0:
            text = err.decode()
            assert "changed while pushing" in text or "moved since the push started" in text, text
            assert attempts[path] < 8
            attempts[path] += 1
            running[path] = start(path)  # the retry
    listing = versions(registry.uri(REPO), **registry.auth)
    hashes = [v.content_hash for v in listing.versions]
    expected = {loractl.describe_adapter(p).record.content_hash for p in adapters}  # type: ignore[union-attr]
    assert listing.versions[4].sha == base.sha  # four new commits on top of the first push
    assert set(hashes[:4]) == expected and len(set(hashes[:5])) == 5  # each landed exactly once
