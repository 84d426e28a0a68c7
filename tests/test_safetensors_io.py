"""The torch-free header reader and the streaming writer, against the safetensors library itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loractl.errors import FormatError, LoractlError
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_header import DTYPE_SIZES, MAX_HEADER_BYTES, is_safetensors, read_header
from loractl.io.safetensors_writer import StreamWriter, TensorSpec, save_tensors
from loractl.io.tensor_bytes import dtype_code, tensor_to_bytes, torch_dtype

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2]  # fmt: skip


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype`: every bit pattern, NaN payloads included."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod()) if shape else 1
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


tensor_dicts = st.dictionaries(
    st.text("abcdefghij._", min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=4).map(tuple), st.integers(0, 2**31)),
    max_size=6,
).map(lambda d: {k: _random(shape, dtype, seed) for k, (dtype, shape, seed) in d.items()})


@given(tensors=tensor_dicts, metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3))
def test_our_files_load_in_safetensors_bit_exactly(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    save_tensors(path, tensors, metadata)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape and _bits(loaded[k]) == _bits(t), k
    with safe_open(path, "pt") as f:
        assert (f.metadata() or {}) == metadata
    header = read_header(path)
    assert header.data_start % 8 == 0
    with Checkpoint(path) as ckpt:
        for k, t in tensors.items():
            assert _bits(ckpt.get(k)) == _bits(t) and ckpt.raw_bytes(k) == _bits(t)


@given(tensors=tensor_dicts)
def test_safetensors_files_read_bit_exactly(
    tensors: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("r") / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert {k: (i.dtype, i.shape) for k, i in header.tensors.items()} == {
        k: (dtype_code(t.dtype), tuple(t.shape)) for k, t in tensors.items()
    }
    with Checkpoint(path) as ckpt:
        for k, t in tensors.items():
            got = ckpt.get(k)
            assert got.dtype == t.dtype and got.shape == t.shape and _bits(got) == _bits(t), k


def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    tensors = {"b": _random((3, 4), torch.bfloat16, 1), "a": _random((2,), torch.float32, 2)}
    save_tensors(tmp_path / "one", tensors, {"k": "v"})
    save_tensors(tmp_path / "two", dict(reversed(list(tensors.items()))), {"k": "v"})
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


def test_stream_writer_refuses_the_wrong_tensor_and_an_early_close(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (3,))]
    writer = StreamWriter(tmp_path / "x", specs)
    with pytest.raises(LoractlError, match="expected tensor a"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(LoractlError, match="header says F32"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", torch.zeros(2))
    with pytest.raises(LoractlError, match="before tensor b"):
        writer.close()


def test_dtype_codes_cover_the_header_reader() -> None:
    assert {dtype_code(d) for d in DTYPES} == set(DTYPE_SIZES)  # every dtype a header may name can be read
    for dtype in DTYPES:
        code = dtype_code(dtype)
        assert torch_dtype(code) == dtype and DTYPE_SIZES[code] == torch.empty(0, dtype=dtype).element_size()
    with pytest.raises(LoractlError):
        dtype_code(torch.complex64)
    with pytest.raises(LoractlError):
        tensor_to_bytes(torch.zeros(1), "F16")


# --- bad input: every lie is a FormatError naming the file --------------------------------------


def _write(
    path: Path, header: Any, data: bytes = b"", length: int | None = None, raw: bytes | None = None, whole: bytes = b""
) -> Path:
    """A file with `header` (or `raw` header bytes) and a length prefix that may lie; `whole` is the file itself."""
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(whole or struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _f32(offsets: list[int], shape: list[int] | None = None, dtype: str = "F32") -> dict[str, Any]:
    n = (offsets[1] - offsets[0]) // 4
    return {"dtype": dtype, "shape": [n] if shape is None else shape, "data_offsets": offsets}


GOOD = {"a": _f32([0, 8]), "b": _f32([8, 16])}
BAD_FILES: dict[str, tuple[dict[str, Any], str]] = {
    "too short": (dict(header=None, whole=b"\x10\x00\x00"), "too short for a safetensors header"),
    "empty header": (dict(header=None, raw=b""), "not valid JSON"),
    "length past the end": (dict(header=GOOD, data=bytes(16), length=10_000), "declares 10000 header bytes"),
    "length over the cap": (dict(header=GOOD, data=bytes(16), length=MAX_HEADER_BYTES + 1), "exceeds the cap"),
    "length too short": (dict(header=GOOD, data=bytes(16), length=20), "not valid JSON"),
    "not utf-8": (dict(header=None, raw=b'{"\xff\xfe": 1}'), "not valid JSON"),
    "not json": (dict(header=None, raw=b"{nope"), "not valid JSON"),
    "not an object": (dict(header=[1, 2]), "not a JSON object"),
    "duplicate keys": (dict(header=None, raw=b'{"a":{},"a":{}}'), "duplicate key"),
    "unknown dtype": (dict(header={"a": _f32([0, 8], dtype="F31")}, data=bytes(8)), "unknown dtype"),
    "dtype not a string": (dict(header={"a": _f32([0, 8], dtype=7)}, data=bytes(8)), "unknown dtype"),  # type: ignore[arg-type]
    "negative dim": (dict(header={"a": _f32([0, 8], shape=[-2])}, data=bytes(8)), "invalid shape"),
    "float dim": (dict(header={"a": _f32([0, 8], shape=[2.0])}, data=bytes(8)), "invalid shape"),  # type: ignore[list-item]
    "offsets not pairs": (dict(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, data=bytes(8)),
                          "invalid data_offsets"),
    "offsets reversed": (dict(header={"a": _f32([8, 0], shape=[2])}, data=bytes(8)), "offsets span"),
    "offsets disagree with shape": (dict(header={"a": _f32([0, 8], shape=[3])}, data=bytes(8)), "needs 12"),
    "out of bounds": (dict(header={"a": _f32([0, 8]), "b": _f32([8, 24])}, data=bytes(16)), "truncated"),
    "overlap": (dict(header={"a": _f32([0, 8]), "b": _f32([4, 12])}, data=bytes(12)), "overlap or leave a gap"),
    "gap": (dict(header={"a": _f32([0, 8]), "b": _f32([12, 20])}, data=bytes(20)), "overlap or leave a gap"),
    "gap at the start": (dict(header={"a": _f32([4, 12])}, data=bytes(12)), "overlap or leave a gap"),
    "trailing bytes": (dict(header=GOOD, data=bytes(20)), "trailing bytes"),
    "metadata not strings": (dict(header={"__metadata__": {"k": 1}, **GOOD}, data=bytes(16)), "__metadata__"),
    "entry not an object": (dict(header={"a": [1]}, data=b""), "not an object"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_header_rejects_lies_with_a_format_error_naming_the_file(case: str, tmp_path: Path) -> None:
    spec, message = BAD_FILES[case]
    path = _write(tmp_path / "bad.safetensors", **spec)
    before = path.read_bytes()
    with pytest.raises(FormatError, match=message) as e:
        read_header(path)
    assert e.value.path == str(path) and str(e.value).startswith(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(FormatError):
        Checkpoint(path)
    assert path.read_bytes() == before


def test_the_good_header_parses(tmp_path: Path) -> None:
    path = _write(tmp_path / "good.safetensors", GOOD, bytes(16))
    header = read_header(path)
    assert list(header.tensors) == ["a", "b"] and header.tensors["b"].offsets == (8, 16)
    assert header.data_start == 8 + len(json.dumps(GOOD))


def test_truncated_real_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)
    full = path.read_bytes()
    for cut in (4, 20, len(full) - 1):
        path.write_bytes(full[:cut])
        with pytest.raises(FormatError, match=r"truncated|too short") as e:
            read_header(path)
        assert e.value.path == str(path)


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read file") as e:
        read_header(tmp_path / "nope.safetensors")
    assert e.value.path == str(tmp_path / "nope.safetensors")


def test_is_safetensors_sniffs_without_parsing(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "x.safetensors")
    (tmp_path / "y.bin").write_bytes(b"\x80\x02garbage-pickle")
    (tmp_path / "z").write_bytes(b"")
    assert is_safetensors(tmp_path / "x.safetensors")
    assert not is_safetensors(tmp_path / "y.bin") and not is_safetensors(tmp_path / "z")
    assert not is_safetensors(tmp_path / "missing")
