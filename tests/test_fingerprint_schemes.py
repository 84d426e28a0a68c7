"""Issue 25: the per-tensor base fingerprint, which a base hashes in the order it stores its tensors.

`STREAM` (`sha256:`) hashes the tensors as one stream in name order; `PER_TENSOR` (`sha256t:`) hashes each
tensor alone and then their digests in name order, so a merge's hash thread can read the base in the merge's own
order (the bytes then come from the page cache, not from the disk twice). Records say which by their prefix, and
records of either kind are checked as taken.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loractl.io.checkpoint import PER_TENSOR, STREAM, Checkpoint, fingerprint_of, scheme_of
from loractl.io.safetensors_writer import save_tensors


def _by_hand(tensors: dict[str, torch.Tensor], codes: dict[str, str]) -> str:
    """The per-tensor definition written out independently: JSON lines of (name, dtype, shape, SHA-256 of the
    bytes) in name order, then SHA-256 of the lines."""
    lines = []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        lines.append(json.dumps([name, codes[name], list(t.shape), hashlib.sha256(raw).hexdigest()]) + "\n")
    return "sha256t:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def test_per_tensor_is_the_definition_by_hand(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "z.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(4, 6, generator=g),
        "m.scale": torch.tensor(2.5),  # 0-d
        "e.weight": torch.zeros(0, 3),  # empty
        "steps": torch.arange(7, dtype=torch.int64),
    }
    codes = {"z.weight": "BF16", "a.weight": "F32", "m.scale": "F32", "e.weight": "F32", "steps": "I64"}
    save_tensors(tmp_path / "model.safetensors", tensors)
    with Checkpoint(tmp_path / "model.safetensors") as ckpt:
        names = list(tensors)
        got = ckpt.fingerprint(names, scheme=PER_TENSOR, fresh=True)
        stream = ckpt.fingerprint(names, fresh=True)
    assert got == _by_hand(tensors, codes)
    assert stream.startswith(STREAM) and scheme_of(stream) == STREAM and scheme_of(got) == PER_TENSOR


def test_per_tensor_is_order_free_and_still_tells_tensors_apart() -> None:
    x, y = b"\x01" * 8, b"\x02" * 8
    items = [("a", "F32", (2,), lambda: x), ("b", "F32", (2,), lambda: y)]
    swapped = [("a", "F32", (2,), lambda: y), ("b", "F32", (2,), lambda: x)]
    forward = fingerprint_of(items, scheme=PER_TENSOR)
    assert fingerprint_of(items[::-1], scheme=PER_TENSOR) == forward  # any order: the same
    assert fingerprint_of(swapped, scheme=PER_TENSOR) != forward  # the bytes of two tensors exchanged
    assert fingerprint_of(items[::-1]) != fingerprint_of(items)  # the stream needs name order
    assert fingerprint_of(items, stop=lambda: True, scheme=PER_TENSOR) == ""


def _flux_files(tmp: Path) -> tuple[Path, Path]:
    """One tiny Flux.1 transformer, bf16, as the original single file and as a diffusers directory."""
    diffusers = pytest.importorskip("diffusers")
    from tests.test_merge_dit import _model
    from tests.test_merge_row_blocks import _flux_single_file

    _model(diffusers).to(torch.bfloat16).save_pretrained(tmp / "dir")
    return _flux_single_file(tmp), tmp / "dir"


def test_per_tensor_is_the_same_in_either_layout_and_read_in_storage_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single Flux file and its diffusers directory give one fingerprint; the single file is read front to back
    (fused q/k/v and linear1 by their row ranges), where the stream definition jumps about the file."""
    from loractl.bases import open_base
    from tests.test_merge_dit import _adapter

    single, directory = _flux_files(tmp_path)
    modules = [*_adapter().modules, "transformer.norm_out.linear"]
    reads: list[tuple[int, int, int]] = []
    real = Checkpoint.row_chunks

    def recording(self: Checkpoint, name: str, start: int, stop: int) -> Iterator[memoryview]:
        reads.append((*self.position(name), start))
        return real(self, name, start, stop)

    monkeypatch.setattr(Checkpoint, "row_chunks", recording)
    prints = {}
    for scheme in (PER_TENSOR, STREAM):
        for path in (single, directory):
            with closing(open_base(path)) as base:
                reads.clear()
                prints[scheme, path] = base.fingerprint(modules, scheme=scheme, fresh=True)
                order = list(reads)
            if path == single:
                in_storage = [r[:2] for r in order] == sorted(r[:2] for r in order)
                assert in_storage == (scheme == PER_TENSOR), scheme
    assert prints[PER_TENSOR, single] == prints[PER_TENSOR, directory]
    assert prints[STREAM, single] == prints[STREAM, directory]


def test_a_record_is_checked_by_its_own_definition(tmp_path: Path) -> None:
    """An adapter that records its base by the stream definition (extract, train, and every record before the
    per-tensor one) merges into that base without a mismatch and keeps it; a merge record taken per tensor is
    found again when the pair is given to `extract` swapped."""
    from loractl.adapter import AdapterMeta
    from loractl.bases import open_base
    from loractl.errors import IntegrityError, UsageError
    from loractl.formats import save_adapter
    from loractl.ops.extract import ExtractConfig, extract_adapter
    from loractl.ops.merge import merge
    from tests.test_merge_dit import _adapter

    single, _ = _flux_files(tmp_path)
    a = _adapter()
    with closing(open_base(single)) as base:
        stream = base.fingerprint(list(a.modules), fresh=True)
    assert scheme_of(stream) == STREAM

    def saved(meta: AdapterMeta, name: str) -> Path:
        return save_adapter(replace(a, meta=meta), tmp_path / name, format="peft")

    kept = merge(single, [saved(AdapterMeta(base_fingerprint=stream), "a")], tmp_path / "m1.safetensors")
    assert kept.fingerprints == (stream,)
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(single, [saved(AdapterMeta(base_fingerprint=STREAM + "0" * 64), "b")], tmp_path / "m2.safetensors")
    fresh = merge(single, [saved(AdapterMeta(), "c")], tmp_path / "m3.safetensors")
    assert fresh.fingerprints[0] and scheme_of(fresh.fingerprints[0]) == PER_TENSOR
    with pytest.raises(UsageError, match="did you swap BASE and FINETUNED"):
        extract_adapter(tmp_path / "m3.safetensors", single, ExtractConfig(rank=2))


def test_text_output_shows_twelve_digits_of_either_kind() -> None:
    from loractl.cli._text import short_hash

    digest = "0123456789abcdef" * 4
    assert short_hash(STREAM + digest) == "sha256:0123456789ab"
    assert short_hash(PER_TENSOR + digest) == "sha256t:0123456789ab"
