"""Checkpoints: single and sharded reads from headers, sharded writes transformers loads, atomic outputs."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loractl.errors import FormatError, InputNotFoundError, OutputExistsError, UsageError
from loractl.io.atomic import TMP_MARKER, atomic_output, ensure_distinct
from loractl.io.checkpoint import INDEX_NAME, Checkpoint
from loractl.io.checkpoint_writer import parse_size, plan_shards, write_sharded
from loractl.io.safetensors_writer import TensorSpec
from loractl.io.tensor_bytes import dtype_code


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.q.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.q.bias": torch.randn(4, generator=g).to(torch.float16),
        "model.layers.1.q.weight": torch.randn(4, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.float64),
        "step": torch.tensor(7),
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def _sharded(root: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[Path]:
    specs = [TensorSpec(k, dtype_code(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    with atomic_output(root) as tmp:
        files = write_sharded(tmp, specs, tensors.__getitem__, max_bytes, metadata={"format": "pt"})
    return [root / f.name for f in files]


def _assert_reads(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.names) == sorted(tensors)
    for k, t in tensors.items():
        info = ckpt.info(k)
        assert (info.dtype, info.shape) == (dtype_code(t.dtype), tuple(t.shape)), k
        got = ckpt.get(k)
        assert got.dtype == t.dtype and _bits(got) == _bits(t) and ckpt.raw_bytes(k) == _bits(t), k


def test_single_file_reads_as_file_or_directory(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / f".x{TMP_MARKER}1").write_text("")
    before = _digests(tmp_path)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        with Checkpoint(path) as ckpt:
            _assert_reads(ckpt, tensors)
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.other_files() == [tmp_path / "config.json"]
    assert _digests(tmp_path) == before


def test_sharded_write_makes_a_valid_index_and_reads_back(tmp_path: Path) -> None:
    tensors = _tensors()
    files = _sharded(tmp_path / "out", tensors, max_bytes=100)
    assert len(files) > 2 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for name, shard in index["weight_map"].items():
        assert name in load_file(tmp_path / "out" / shard)  # the index tells the truth
    with Checkpoint(tmp_path / "out") as ckpt:
        _assert_reads(ckpt, tensors)
        assert {ckpt.shard_of(k).name for k in tensors} == {f.name for f in files}
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]


def test_one_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    files = _sharded(tmp_path / "out", _tensors(), max_bytes=10**9)
    assert [f.name for f in files] == ["model.safetensors"] and not (tmp_path / "out" / INDEX_NAME).exists()


def test_sharded_write_is_deterministic(tmp_path: Path) -> None:
    """Same specs in the same order, same bytes (shards follow the caller's order, e.g. the base's)."""
    _sharded(tmp_path / "a", _tensors(), 100)
    _sharded(tmp_path / "b", _tensors(), 100)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_plan_shards_respects_the_limit_and_gives_a_big_tensor_its_own_shard() -> None:
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 100, 5, 5])]
    shards = plan_shards(specs, 80)
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_fingerprint_is_order_independent_and_sees_every_byte(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors")
    changed = dict(tensors)
    changed["model.layers.1.q.weight"] = changed["model.layers.1.q.weight"].clone()
    changed["model.layers.1.q.weight"].view(torch.int32)[0, 0] ^= 1
    save_file(changed, tmp_path / "b.safetensors")
    _sharded(tmp_path / "c", tensors, 100)
    names = ["model.layers.0.q.weight", "model.layers.1.q.weight"]
    a, b, c = Checkpoint(tmp_path / "a.safetensors"), Checkpoint(tmp_path / "b.safetensors"), Checkpoint(tmp_path / "c")
    assert a.fingerprint(names) == a.fingerprint(names[::-1]) == c.fingerprint(names)  # single or sharded alike
    assert a.fingerprint(names) != b.fingerprint(names)
    assert a.fingerprint(names[:1]) == b.fingerprint(names[:1])
    for ckpt in (a, b, c):
        ckpt.close()


def test_transformers_loads_our_shards_and_we_read_its_shards(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from fixtures.make_fixtures import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    assert (tmp_path / "theirs" / INDEX_NAME).is_file()
    with Checkpoint(tmp_path / "theirs") as ckpt:
        _assert_reads(ckpt, {k: state[k] for k in ckpt.names})
        assert len(ckpt.headers) > 1
        ours = {k: ckpt.get(k) for k in ckpt.names}
    _sharded(tmp_path / "ours", ours, 100_000)
    (tmp_path / "ours" / "config.json").write_text((tmp_path / "theirs" / "config.json").read_text())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- bad checkpoints ----------------------------------------------------------------------------


def test_missing_or_empty_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(FormatError, match=r"no model\.safetensors") as e:
        Checkpoint(tmp_path)
    assert e.value.path == str(tmp_path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("not json", "malformed index"),
        ('{"weight_map": 3}', "malformed index"),
        ('{"metadata": {}}', "malformed index"),
        ('{"weight_map": {"a": "gone.safetensors"}}', "missing"),
        ('{"weight_map": {"a": "../outside.safetensors"}}', "outside the checkpoint"),
    ],
)
def test_bad_index_is_a_format_error_naming_it(tmp_path: Path, index: str, message: str) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    save_file({"a": torch.zeros(1)}, tmp_path / "outside.safetensors")
    (root / INDEX_NAME).write_text(index)
    with pytest.raises(FormatError, match=message) as e:
        Checkpoint(root)
    assert e.value.path == str(root / INDEX_NAME)


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "s2.safetensors")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(FormatError, match="two shards"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"a": "s2.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}, "puts tensor 'a' in s2.* it is in s1"),
        (
            {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors", "d": "s2.safetensors"},
            "'d' .* no shard",
        ),
        ({"a": "s1.safetensors", "b": "s2.safetensors"}, "missing from the index .*'c'"),
    ],
)
def test_index_must_agree_with_the_shards(tmp_path: Path, weight_map: dict[str, str], message: str) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.ones(1), "c": torch.ones(2)}, tmp_path / "s2.safetensors")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match=message) as e:
        Checkpoint(tmp_path)
    assert e.value.path == str(tmp_path / INDEX_NAME)


def test_truncated_shard_is_refused_naming_the_shard(tmp_path: Path) -> None:
    _sharded(tmp_path / "out", _tensors(), 100)
    shard = tmp_path / "out" / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(FormatError, match="truncated") as e:
        Checkpoint(tmp_path / "out")
    assert e.value.path == str(shard)


# --- atomic outputs -----------------------------------------------------------------------------


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if TMP_MARKER in p.name]


def test_atomic_output_leaves_nothing_when_the_body_raises(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "half.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert not final.exists() and _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "file.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_write_sharded_failure_midway_leaves_no_output(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [TensorSpec(k, dtype_code(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    produced: list[str] = []

    def produce(name: str) -> torch.Tensor:
        if len(produced) == 3:
            raise ValueError("disk full")
        produced.append(name)
        return tensors[name]

    with pytest.raises(ValueError, match="disk full"), atomic_output(tmp_path / "out") as tmp:
        write_sharded(tmp, specs, produce, 100)
    assert os.listdir(tmp_path) == []


def test_atomic_output_refuses_an_existing_path_unless_forced(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(OutputExistsError), atomic_output(final):
        pytest.fail("the body must not run")
    with pytest.raises(RuntimeError), atomic_output(final, force=True) as tmp:
        tmp.mkdir()
        raise RuntimeError
    assert os.listdir(final) == ["old"]  # a failed forced write keeps the old content
    with atomic_output(final, force=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert os.listdir(final) == ["new"] and _leftovers(tmp_path) == []


def test_ensure_distinct_refuses_output_over_an_input(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for bad in (tmp_path / "in", tmp_path / "in" / "sub", tmp_path):
        with pytest.raises(UsageError, match="would overwrite"):
            ensure_distinct(bad, [tmp_path / "in"])
    ensure_distinct(tmp_path / "out", [tmp_path / "in"])


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500), (" 2 GiB ", 2 * 2**30), ("10", 10)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", "five"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_row_chunks_keep_a_read_ahead_window_beyond_the_small_hashed_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash reads chunks small enough to stay in cache, but asks the kernel for `READ_AHEAD` bytes beyond the
    chunk it reads (a cold file streams): each byte after the first chunk asked for once, in order, and when a
    chunk is read the window beyond it is asked for already."""
    from loractl.io import checkpoint

    weight = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)  # 32-byte rows
    save_file({"w": weight}, str(tmp_path / "m.safetensors"))
    monkeypatch.setattr(checkpoint, "HASH_BLOCK", 2 * 32)
    monkeypatch.setattr(checkpoint, "READ_AHEAD", 10 * 32)
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(checkpoint, "will_need", lambda fd, offset, nbytes: asked.append((offset, nbytes)))
    with Checkpoint(tmp_path / "m.safetensors") as ckpt:
        at, read = ckpt.file_range("w").offset, b""
        for chunk in ckpt.row_chunks("w", 0, 64):
            read += bytes(chunk)
            end = asked[-1][0] + asked[-1][1] - at  # bytes asked for so far
            assert end == min(64 * 32, len(read) + 10 * 32), len(read)
    assert read == _bits(weight)
    assert asked[0][0] == at + 2 * 32  # the first chunk is read at once
    assert all(o + n == nxt for (o, n), (nxt, _) in itertools.pairwise(asked))  # in order, once each
