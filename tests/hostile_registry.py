"""A seeded generator of hostile `file://` registries: what an attacker who can write the directory plants.

`build(root, seed)` pushes a real adapter into one repository per case, then damages it the way
a hostile or broken registry would (issue 27): objects swapped for links to `/dev/zero`, for a
FIFO, for a link to another object, objects longer or shorter than their records say, records
whose hashes are paths (`"/dev/zero"`) or whose sizes are 2^62, a commit whose parent is itself,
refs that hold garbage or link out, a deleted object, a file and a folder of one name. The seed
picks which object is damaged and the garbage written, so the same seed gives the same registry.

Each case names the command to run against it and the `error:` text it must end with.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loractl.remote import push
from loractl.remote.store import RepoStore

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "fixtures" / "adapters" / "tiny-qv"


@dataclass(frozen=True)
class Case:
    """One hostile repository: the REPO argument, the command's extra arguments, what its error says."""

    name: str
    repo: str
    command: str  # "pull" or "versions"
    says: str  # a fragment of the one-line error
    args: tuple[str, ...] = ()


def _record(store: RepoStore, doc: dict[str, Any]) -> str:
    """Write a commit record exactly as the store names them (sha1 of its canonical JSON); its sha."""
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sha = hashlib.sha1(raw).hexdigest()
    (store.path / "commits" / f"{sha}.json").write_bytes(raw)
    return sha


def _head_doc(store: RepoStore) -> tuple[str, dict[str, Any]]:
    head = store.resolve("main")
    return head, json.loads((store.path / "commits" / f"{head}.json").read_text())


def _move_main(store: RepoStore, sha: str) -> None:
    (store.path / "refs" / "heads" / "main").write_text(sha)


def _weights(store: RepoStore, rng: random.Random) -> Path:
    """One of the head's objects, chosen by the seed among the adapter's files."""
    files = store.files(store.resolve("main"))
    name = rng.choice(sorted(n for n in files if n.startswith("adapter_")))
    return store.blob(files[name].sha256 or "")


def _entry_lie(field: str, value: Any) -> Callable[[RepoStore, random.Random], None]:
    def lie(store: RepoStore, rng: random.Random) -> None:
        head, doc = _head_doc(store)
        name = rng.choice(sorted(n for n in doc["files"] if n.startswith("adapter_")))
        doc["files"][name][field] = value
        _move_main(store, _record(store, {**doc, "parent": head}))

    return lie


def _card_lie(store: RepoStore, rng: random.Random) -> None:
    head, doc = _head_doc(store)
    doc["files"]["README.md"]["sha256"] = "/dev/zero"
    _move_main(store, _record(store, {**doc, "parent": head}))


def _self_parent(store: RepoStore, rng: random.Random) -> None:
    """A record named X whose parent is X (it cannot hash to its name: the check that catches it)."""
    _, doc = _head_doc(store)
    raw = json.dumps({**doc, "title": f"loop {rng.random()}"}, sort_keys=True, separators=(",", ":"))
    sha = hashlib.sha1(raw.encode()).hexdigest()
    raw = json.dumps({**doc, "parent": sha}, sort_keys=True, separators=(",", ":"))
    (store.path / "commits" / f"{sha}.json").write_text(raw)
    _move_main(store, sha)


def _swap(make: Callable[[Path, random.Random], None]) -> Callable[[RepoStore, random.Random], None]:
    def lie(store: RepoStore, rng: random.Random) -> None:
        target = _weights(store, rng)
        target.unlink()
        make(target, rng)

    return lie


def _other_object(target: Path, rng: random.Random) -> None:
    others = sorted(p for p in target.parent.iterdir() if p != target)
    target.symlink_to(rng.choice(others))


def _flip_byte(store: RepoStore, rng: random.Random) -> None:
    target = _weights(store, rng)
    data = bytearray(target.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 + rng.randrange(255)
    target.write_bytes(bytes(data))


def _append(store: RepoStore, rng: random.Random) -> None:
    with _weights(store, rng).open("ab") as f:
        f.write(rng.randbytes(1 + rng.randrange(4096)))


def _ref_garbage(store: RepoStore, rng: random.Random) -> None:
    _move_main(store, rng.choice(["/etc/passwd", "../../../../etc/hostname", "x" * 40, "0" * 39]))


def _ref_link(store: RepoStore, rng: random.Random) -> None:
    ref = store.path / "refs" / "heads" / "main"
    ref.unlink()
    ref.symlink_to("/dev/zero")


def _file_and_folder(store: RepoStore, rng: random.Random) -> None:
    store.plant("main", "sub", rng.randbytes(16))
    store.plant("main", "sub/inner.txt", rng.randbytes(16))


LIES: dict[str, tuple[Callable[[RepoStore, random.Random], None], str, str]] = {
    # name: (damage, command, what the error says)
    "object-link-to-dev-zero": (_swap(lambda t, _: t.symlink_to("/dev/zero")), "pull", "link out of the registry"),
    "object-fifo": (_swap(lambda t, _: os.mkfifo(t)), "pull", "not a regular file"),
    "object-link-to-another-object": (_swap(_other_object), "pull", "its record says"),
    "object-deleted": (_swap(lambda t, _: None), "pull", "missing from the registry"),
    "object-longer-than-its-record": (_append, "pull", "its record says"),
    "object-same-size-other-bytes": (_flip_byte, "pull", "the registry says"),
    "record-sha256-is-dev-zero": (_entry_lie("sha256", "/dev/zero"), "pull", "malformed"),
    "record-sha256-dotdot": (_entry_lie("sha256", "../../../../../dev/zero"), "pull", "malformed"),
    "record-size-2^62": (_entry_lie("size", 2**62), "pull", "its record says"),
    "record-size-negative": (_entry_lie("size", -1), "pull", "malformed"),
    "card-sha256-is-dev-zero": (_card_lie, "versions", "malformed"),
    "commit-is-its-own-parent": (_self_parent, "versions", "does not hash to its name"),
    "ref-holds-garbage": (_ref_garbage, "versions", "not a commit sha"),
    "ref-links-to-dev-zero": (_ref_link, "versions", "link out of the registry"),
    "file-and-folder-of-one-name": (_file_and_folder, "pull", "both a file 'sub'"),
}


def build(root: Path, seed: int) -> list[Case]:
    """One damaged repository per lie under `root` (a registry directory); the same seed, the same damage."""
    rng = random.Random(seed)
    cases = []
    for i, (name, (lie, command, says)) in enumerate(LIES.items()):
        repo = f"file://{root}/hostile/r{i}"
        push(ADAPTER, repo, create=True)
        lie(RepoStore(root / "hostile" / f"r{i}"), rng)
        cases.append(Case(name, repo, command, says))
    return cases
