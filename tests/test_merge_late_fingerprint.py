"""Issue 25's time goal: a rewritten base's fingerprint is hashed beside the merge, not before it.

The provenance record goes into the output's header (written first) with a placeholder of the fingerprint's
length, and the digest is written over it once hashed (`bases.placeholders`). What the user gets must not depend on
it: the output of a merge into a fresh base (hashed beside) is byte for byte the output of the same merge with the
fingerprint remembered (nothing hashed), and its record holds the fingerprint hashed afresh.
"""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest

import loractl.ops.merge_placed as placed
from loractl.bases import open_base, placeholders
from loractl.bases.sd_single_file import RECORD_KEY
from loractl.io import fingerprint_cache
from loractl.io.checkpoint import PER_TENSOR
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.merge import merge
from tests.helpers import save
from tests.test_merge_gguf import adapter as gguf_adapter
from tests.test_merge_gguf import tiny_gguf


@pytest.fixture(autouse=True)
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORACTL_CACHE_DIR", str(tmp_path / "cache"))


def _fresh_and_remembered(
    base: Path, lora: Path, tmp: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, bytes, str | None]:
    """The merge into `base` with its fingerprint not yet known, then again with it remembered."""
    seen: list[bytes] = []
    real = placeholders.fill

    def watched(outputs: list[Path], values: dict[str, str]) -> None:
        seen.extend(t.encode() for t in values)
        assert all(t.encode() in outputs[0].read_bytes() for t in values)  # the header went out with the token
        real(outputs, values)

    with monkeypatch.context() as m:
        m.setattr(placeholders, "fill", watched)
        fresh = merge(base, [lora], tmp / f"fresh{suffix}")
    assert len(seen) == 1  # hashed beside the merge, written last
    remembered = merge(base, [lora], tmp / f"remembered{suffix}")
    assert fresh.fingerprints == remembered.fingerprints
    a, b = (tmp / f"fresh{suffix}").read_bytes(), (tmp / f"remembered{suffix}").read_bytes()
    assert seen[0] not in a
    return a, b, fresh.fingerprints[0]


def test_a_single_file_diffusion_base_gets_the_fingerprint_written_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loractl.formats import save_adapter
    from tests.test_merge_dit import _adapter
    from tests.test_merge_row_blocks import _flux_single_file

    base = _flux_single_file(tmp_path)
    a = _adapter()
    lora = save_adapter(a, tmp_path / "lora.safetensors", format="kohya")
    fresh, remembered, fingerprint = _fresh_and_remembered(base, lora, tmp_path, ".safetensors", monkeypatch)
    assert fresh == remembered
    with closing(open_base(base)) as b:
        assert fingerprint == b.fingerprint(list(a.modules), fresh=True, scheme=PER_TENSOR)
    header = json.loads(fresh[8 : 8 + int.from_bytes(fresh[:8], "little")])
    record = json.loads(header["__metadata__"][RECORD_KEY])
    assert record["adapters"][0]["base_fingerprint"] == fingerprint


def test_a_gguf_base_gets_the_fingerprint_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    base = tiny_gguf(tmp_path / "base.gguf", "F16")
    lora = save(gguf_adapter(), tmp_path / "lora")
    fresh, remembered, fingerprint = _fresh_and_remembered(base, lora, tmp_path, ".gguf", monkeypatch)
    assert fresh == remembered and fingerprint
    record = json.loads(gguf.GGUFReader(tmp_path / "fresh.gguf").fields["loractl.merge"].contents())
    assert record["adapters"][0]["base_fingerprint"] == fingerprint


def test_an_adapter_recording_its_base_is_checked_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a fingerprint nobody checks waits: one an adapter records is hashed (and compared) first."""
    from dataclasses import replace

    from loractl.adapter import AdapterMeta
    from loractl.errors import IntegrityError

    base = tiny_gguf(tmp_path / "base.gguf", "F16")
    other = replace(gguf_adapter(), meta=AdapterMeta(base_fingerprint="sha256:" + "0" * 64))
    monkeypatch.setattr(placed, "_write", lambda *a: pytest.fail("written before the check"))
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(base, [save(other, tmp_path / "lora")], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_a_failed_merge_abandons_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge fails while the hash runs: the command ends without waiting for the rest of it, and leaves
    nothing (no output, no temporary, nothing remembered half way)."""
    import threading

    from loractl.errors import LoractlError

    base = tiny_gguf(tmp_path / "base.gguf", "F16")
    lora = save(gguf_adapter(), tmp_path / "lora")
    started, abandoned = threading.Event(), threading.Event()
    real = placed._late_fingerprints

    def slow(plan: object, adapters: list[int], stop: threading.Event, pace: object) -> dict[int, str]:
        started.set()
        assert stop.wait(30)  # the hash "runs" until the merge fails
        abandoned.set()
        return real(plan, adapters, stop, pace)  # type: ignore[arg-type]

    def failing(*args: object) -> None:
        assert started.wait(30)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(placed, "_late_fingerprints", slow)
    monkeypatch.setattr(placed, "_write", failing)
    with pytest.raises((OSError, LoractlError)):
        merge(base, [lora], tmp_path / "out.gguf")
    assert abandoned.is_set()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["base.gguf", "lora"]
    assert not [p for p in fingerprint_cache.cache_dir().rglob("*") if p.is_file()]


def test_the_hash_reads_a_tensor_only_once_the_merge_has_started_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paced (`io.read_pace`): the hash beside a merge into a fresh Flux single file never reads a stored tensor
    before the merge has started on it, though the merge is slowed here and the hash could run far ahead; a merge
    that fails before it starts any releases the waiting hash (it ends at once, abandoned)."""
    import time

    from loractl.errors import LoractlError
    from loractl.formats import save_adapter
    from loractl.io.read_pace import ReadPace
    from tests.test_merge_dit import _adapter
    from tests.test_merge_row_blocks import _flux_single_file

    base = _flux_single_file(tmp_path)
    lora = save_adapter(_adapter(), tmp_path / "lora.safetensors", format="kohya")
    events: list[tuple[str, str]] = []
    real_started, real_wait = ReadPace.started, ReadPace.wait_for

    def started(self: ReadPace, key: str) -> None:
        time.sleep(0.01)
        events.append(("merge", key))
        real_started(self, key)

    def wait_for(self: ReadPace, key: str) -> None:
        real_wait(self, key)
        events.append(("hash", key))

    monkeypatch.setattr(ReadPace, "started", started)
    monkeypatch.setattr(ReadPace, "wait_for", wait_for)
    merge(base, [lora], tmp_path / "out.safetensors")
    hashed = [k for who, k in events if who == "hash"]
    assert len(hashed) > 20
    for i, (who, key) in enumerate(events):
        if who == "hash":
            assert ("merge", key) in events[:i], key

    def failing(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(placed, "_write", failing)
    monkeypatch.setenv("LORACTL_CACHE_DIR", str(tmp_path / "cache2"))  # not remembered: the hash waits again
    begun = time.perf_counter()
    with pytest.raises((OSError, LoractlError)):
        merge(base, [lora], tmp_path / "again.safetensors")
    assert time.perf_counter() - begun < 20 and not (tmp_path / "again.safetensors").exists()


def test_fill_overwrites_the_header_only_and_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    import torch

    token, digest = placeholders.token(), "ab" * 32
    path = tmp_path / "f.safetensors"
    data = torch.frombuffer(bytearray(token.encode()), dtype=torch.uint8)  # the same bytes in the data too
    save_tensors(path, {"t": data}, metadata={"record": json.dumps({"fp": "sha256:" + token})})
    placeholders.fill([path], {token: digest})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert digest.encode() in raw[: 8 + n] and token.encode() not in raw[: 8 + n]
    assert raw[8 + n :].endswith(token.encode())  # the tensor's bytes are never touched
    with pytest.raises(RuntimeError, match="not found"):
        placeholders.fill([path], {placeholders.token(): digest})
    with pytest.raises(ValueError, match="length"):
        placeholders.fill([path], {token: "ab"})
