"""Hostile files: every reader, and format detection, over mutated real files.

Seeds are the shipped fixtures, files each format's writer produces, and the real files in
`../shared/real-adapters` when present. Each example mutates one file of a seed (truncation,
flipped bytes, lying header lengths and offsets, huge shapes, duplicate keys, non-UTF-8 and
deeply nested metadata, non-finite alphas, zero or negative ranks, mismatched A/B) and reads it.
The only outcomes allowed: a `LoractlError`, or success with a consistent adapter (finite
scales, positive ranks, A and B that fit) or error findings. Any other exception, or a read
that takes longer than `DEADLINE_S`, fails the test. Memory is bounded by a separate test
that reads huge-shape files in a child process under `RLIMIT_AS`.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REAL_ADAPTERS
from helpers import random_module
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, composite

from loractl.adapter import Adapter, AdapterMeta
from loractl.errors import LoractlError
from loractl.formats import FORMATS, describe_adapter, detect_format, format_fills, load_adapter, save_adapter
from loractl.formats.options import ReadOptions, WriteOptions
from loractl.io.safetensors_header import is_safetensors
from loractl.validation import validate_adapter

BASE = FIXTURES / "tiny-llama"
DEADLINE_S = 20  # per example: generous on a loaded 2-core machine; a hang is minutes
NASTY = [
    float("nan"), float("inf"), -float("inf"), 0, -1, -(2**63), 2**70, 1e308, "8", "x", None, True, [], {},
    {"a": 1}, [[[[[[[[]]]]]]]], {".*": 0}, {"(": 4}, {"q_proj": float("nan")},
]  # fmt: skip
CONFIG_KEYS = [
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save",
    "use_dora", "fan_in_fan_out", "lora_bias", "task_type", "peft_type", "bias", "lora_parameters",
    "fine_tune_type", "num_layers", "base_model_name_or_path", "model", "layers_to_transform",
]  # fmt: skip


@dataclass(frozen=True)
class Seed:
    """A valid adapter on disk: the path to read, its format, and the options it needs."""

    name: str
    format: str
    path: Path
    options: ReadOptions


def _adapter(prefix: str) -> Adapter:
    mods = {}
    for i in range(2):
        mods[f"{prefix}layers.{i}.self_attn.q_proj"] = random_module(64, 64, 4, seed=i)
        mods[f"{prefix}layers.{i}.self_attn.v_proj"] = random_module(32, 64, 4, seed=10 + i)
    return Adapter(modules=mods, meta=AdapterMeta(base_model="tiny"))


def _written_seeds(root: Path) -> list[Seed]:
    llama, clip = _adapter("model."), _adapter("text_encoder.text_model.encoder.")
    out = []
    names = {"gguf": "a.gguf", "kohya": "a.safetensors", "diffusers": "d.safetensors", "loralib": "l.bin"}
    for fmt in FORMATS:
        path = root / names.get(fmt, fmt)
        save_adapter(
            clip if fmt in ("diffusers", "original") else llama,
            path,
            format=fmt,
            options=WriteOptions(base=BASE, alpha=8),
        )
        out.append(Seed(f"written-{fmt}", fmt, path, ReadOptions(allow_pickle=True, base=BASE, **_lacking(fmt, 8))))
    pickled = root / "peft-bin"  # PEFT's legacy pickle layout
    shutil.copytree(FIXTURES / "adapters" / "tiny-qv", pickled)
    weights = pickled / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), pickled / "adapter_model.bin")
    weights.unlink()
    out.append(Seed("written-peft-bin", "peft", pickled, ReadOptions(allow_pickle=True, base=BASE)))
    return out


def _shipped_seeds() -> list[Seed]:
    seeds = [
        Seed(f"fixture-{p.name}", "peft", p, ReadOptions(base=BASE)) for p in sorted((FIXTURES / "adapters").iterdir())
    ]
    real = {
        "peft-gpt2-seqcls-fanin": ("peft", ""),
        "diffusers-loradot-sd15-and-misconverted": ("diffusers", "2100-lora.safetensors"),
        "mlx-lm-qwen2.5-0.5b": ("mlx", ""),
        "loralib-roberta-base-mnli": ("loralib", "roberta_base_lora_mnli.bin"),
    }
    for name, (fmt, file) in real.items():
        path = REAL_ADAPTERS / name / file
        if path.exists():
            seeds.append(Seed(f"real-{name}", fmt, path, ReadOptions(allow_pickle=True, **_lacking(fmt, 16))))
    return seeds


def _lacking(fmt: str, alpha: float) -> dict[str, float]:
    """`alpha` for the formats whose files may lack one; the others refuse it."""
    return {"alpha": alpha} if "alpha" in format_fills(fmt) else {}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    return _shipped_seeds() + _written_seeds(tmp_path_factory.mktemp("seeds"))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


# --- mutations: each takes the file's bytes and returns new bytes ---------------------------------

Mutation = Callable[[bytes], bytes]


def _split_safetensors(data: bytes) -> tuple[dict[str, object], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header: bytes, body: bytes, lie: int = 0) -> bytes:
    return struct.pack("<Q", max(0, len(header) + lie)) + header + body


def _tensor_names(header: dict[str, object]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


@composite
def header_mutation(draw: DrawFn) -> Mutation:
    """A lie in a safetensors header (the file stays otherwise intact)."""
    kind = draw(
        st.sampled_from(
            [
                "length", "offset", "huge-shape", "reshape", "zero-rank", "duplicate", "non-utf8", "deep-metadata",
                "metadata-type", "record", "names-record", "nonfinite-data", "dtype",
            ]
        )
    )  # fmt: skip
    pick, delta = draw(st.integers(0, 10_000)), draw(st.sampled_from([-9, -1, 1, 7, 2**20, 2**40, 2**63]))
    value = draw(st.sampled_from(NASTY))

    def mutate(data: bytes) -> bytes:
        header, body = _split_safetensors(data)
        names = _tensor_names(header)
        name = names[pick % len(names)] if names else "x"
        entry = header.get(name)
        entry = entry if isinstance(entry, dict) else {}
        meta = header["__metadata__"] = dict(header.get("__metadata__") or {})  # type: ignore[call-overload]
        if kind == "length":
            return _join_safetensors(json.dumps(header).encode(), body, lie=delta)
        if kind == "offset":
            offsets = entry.get("data_offsets", [0, 0])
            entry["data_offsets"] = [offsets[0], max(0, offsets[1] + delta)] if pick % 2 else [offsets[0] + delta, 1]
        elif kind == "huge-shape":
            entry["shape"] = [2**40, 2**40] if pick % 2 else [2**31, 2**31, 2**31]
        elif kind == "reshape":  # same byte count, other shape: mismatched A/B, wrong ndim
            numel = math.prod(entry.get("shape", [1]))
            entry["shape"] = [[numel], [1, numel], [numel, 1], list(reversed(entry.get("shape", [])))][pick % 4]
        elif kind == "zero-rank":
            shape = entry.get("shape", [1])
            entry["shape"] = [0, *shape[1:]] if pick % 2 else [*shape[:-1], 0]
        elif kind == "duplicate":
            raw = json.dumps(header)
            return _join_safetensors(raw[:-1].encode() + f", {json.dumps(name)}: {json.dumps(entry)}}}".encode(), body)
        elif kind == "non-utf8":
            raw = json.dumps(header).encode()
            at = raw.find(b'"', pick % max(1, len(raw))) + 1 or 1
            return _join_safetensors(raw[:at] + b"\xff\xfe\xc3" + raw[at:], body)
        elif kind == "deep-metadata":
            raw = json.dumps(header).encode()
            deep = b"[" * (500 + pick) + b"]" * (500 + pick)
            return _join_safetensors(raw[:-1] + b', "__deep__": ' + deep + b"}", body)
        elif kind == "metadata-type":
            meta[name] = value
        elif kind == "record":
            meta["loractl"] = json.dumps({"scales": {name.rsplit(".", 2)[0]: value}, "lineage": value, "base": value})
        elif kind == "names-record":
            meta["loractl_module_paths"] = "{not json" if pick % 2 else json.dumps(value)
        elif kind == "nonfinite-data":
            return data[: len(data) - len(body)] + _nonfinite(body, entry)
        else:
            entry["dtype"] = ["F32", "F64", "I8", "BOOL", "Q4", None, 3][pick % 7]
        return _join_safetensors(json.dumps(header).encode(), body)

    mutate.__name__ = f"header-{kind}"
    return mutate


def _nonfinite(body: bytes, entry: dict[str, object]) -> bytes:
    start, end = entry.get("data_offsets", [0, 0])  # type: ignore[misc]
    code = {"F32": struct.pack("<f", float("nan")), "F16": b"\x00\x7c", "BF16": b"\x80\x7f"}.get(
        str(entry.get("dtype")), struct.pack("<f", float("inf"))
    )
    fill = (code * ((end - start) // len(code) + 1))[: end - start]
    return body[:start] + fill + body[end:]


@composite
def config_mutation(draw: DrawFn) -> Mutation:
    """A hostile adapter_config.json: nasty values, nesting, or bytes that are not UTF-8 or JSON."""
    kind = draw(st.sampled_from(["set", "set-nested", "replace", "deep", "non-utf8"]))
    key, value = draw(st.sampled_from(CONFIG_KEYS)), draw(st.sampled_from(NASTY))
    inner = draw(st.sampled_from(["rank", "scale", "alpha", "keys"]))

    def mutate(data: bytes) -> bytes:
        if kind == "deep":
            return b"[" * 100_000 + b"]" * 100_000
        if kind == "non-utf8":
            return data[: len(data) // 2] + b"\xff\xfe\x80" + data[len(data) // 2 :]
        if kind == "replace":
            return json.dumps(value).encode()
        doc = json.loads(data)
        if kind == "set":
            doc[key] = value
        else:
            doc.setdefault("lora_parameters", {})[inner] = value
        return json.dumps(doc).encode()

    mutate.__name__ = f"config-{kind}"
    return mutate


@composite
def byte_mutation(draw: DrawFn) -> Mutation:
    """Truncation or flipped bytes anywhere (header, data, zip directory, GGUF tables)."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip-head"]))
    where = draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8))
    xor = draw(st.integers(1, 255))

    def mutate(data: bytes) -> bytes:
        if kind == "truncate":
            return data[: int(where[0] * len(data))]
        out = bytearray(data)
        span = min(len(out), 4096) if kind == "flip-head" else len(out)
        for w in where:
            if span:
                out[int(w * span)] ^= xor
        return bytes(out)

    mutate.__name__ = f"bytes-{kind}"
    return mutate


def mutation_for(file: Path) -> st.SearchStrategy[Mutation]:
    if file.suffix == ".json":
        return st.one_of(config_mutation(), byte_mutation())
    if is_safetensors(file):
        return st.one_of(header_mutation(), header_mutation(), byte_mutation())
    return byte_mutation()


# --- running a read under the rules --------------------------------------------------------------


class Hang(Exception):
    """A read ran past `DEADLINE_S`."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"read took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_read(path: Path, format: str | None, options: ReadOptions) -> str:
    """Describe, load and validate `path`; returns the outcome, raises on a bug or an inconsistent success."""
    with deadline(DEADLINE_S):
        try:
            info = describe_adapter(path, format=format, options=options)
        except LoractlError as e:
            assert str(e).strip(), "a LoractlError without a message"
            return "refused"
        if not info.errors:
            for name, m in info.modules.items():
                assert m.rank > 0 and math.isfinite(m.scale), (
                    f"{name}: rank {m.rank}, scale {m.scale} without a finding"
                )
        try:
            adapter = load_adapter(path, format=format, options=options)
        except LoractlError:
            return "described, load refused"
        adapter.check()
        assert all(m.rank > 0 for m in adapter.modules.values())
        report = validate_adapter(path, format=format, allow_pickle=options.allow_pickle)
        json.dumps(report.to_dict(), allow_nan=False)
        return "read"


def _mutated_copy(seed: Seed, index: int, mutation: Mutation, into: Path) -> Path:
    """A copy of the seed with its `index`-th file mutated; returns the path to read."""
    root = seed.path if seed.path.is_dir() else seed.path.parent
    files = _files(seed.path)
    target = files[index % len(files)]
    copy = into / "seed"
    if seed.path.is_dir():
        shutil.copytree(root, copy)
    else:
        copy.mkdir()
        shutil.copy2(seed.path, copy / seed.path.name)
    (copy / target.name).write_bytes(mutation(target.read_bytes()))
    return copy if seed.path.is_dir() else copy / seed.path.name


@composite
def mutated(draw: DrawFn, seeds: list[Seed]) -> tuple[Seed, int, Mutation]:
    seed = draw(st.sampled_from(seeds))
    index = draw(st.integers(0, 7))
    files = _files(seed.path)
    return seed, index, draw(mutation_for(files[index % len(files)]))


def _run_example(example: tuple[Seed, int, Mutation], format_of: Callable[[Seed], str | None]) -> None:
    seed, index, mutation = example
    with tempfile.TemporaryDirectory() as tmp:
        path = _mutated_copy(seed, index, mutation, Path(tmp))
        try:
            check_read(path, format_of(seed), seed.options)
        except (Hang, AssertionError) as e:
            raise AssertionError(f"{seed.name} [{mutation.__name__}]: {e}") from e
        except Exception as e:
            raise AssertionError(f"{seed.name} [{mutation.__name__}]: {type(e).__name__}: {e}") from e


def test_seeds_are_valid_adapters(seeds: list[Seed]) -> None:
    """The fuzzing starts from files every reader accepts, so refusals below are the mutations' doing."""
    assert {s.format for s in seeds} == set(FORMATS)
    for seed in seeds:
        assert detect_format(seed.path) == seed.format, seed.name
        assert check_read(seed.path, seed.format, seed.options) == "read", seed.name


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=30)
@given(data=st.data())
def test_reader_survives_hostile_files(seeds: list[Seed], fmt: str, data: st.DataObject) -> None:
    """Each reader, forced onto mutated files of its own format."""
    _run_example(data.draw(mutated([s for s in seeds if s.format == fmt])), lambda s: s.format)


@settings(max_examples=40)
@given(data=st.data())
def test_detection_survives_hostile_files(seeds: list[Seed], data: st.DataObject) -> None:
    """Format detection, then the detected reader, on mutated files of every format."""
    _run_example(data.draw(mutated(seeds)), lambda s: None)


@settings(max_examples=25)
@given(data=st.data(), fmt=st.sampled_from(sorted(FORMATS)))
def test_every_reader_survives_other_formats_files(seeds: list[Seed], fmt: str, data: st.DataObject) -> None:
    """A reader forced (`--from`) onto a file of another format refuses it cleanly."""
    _run_example(data.draw(mutated(seeds)), lambda s: fmt)


# --- huge declared shapes, read under an address-space limit ------------------------------------

_LIMITED_READER = r"""
import json, resource, sys
from pathlib import Path
import torch, numpy, gguf
from loractl.errors import LoractlError
from loractl.formats import describe_adapter, detect_format, format_fills, load_adapter
from loractl.formats.options import ReadOptions

vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
for path in sys.argv[2:]:
    try:
        alpha = 8.0 if "alpha" in format_fills(detect_format(path)) else None  # only where a file may lack it
        options = ReadOptions(allow_pickle=True, base=Path(sys.argv[1]), alpha=alpha)
        describe_adapter(path, options=options)
        load_adapter(path, options=options)
        outcome = "read"
    except LoractlError as e:
        outcome = "refused: " + str(e)
    except BaseException as e:
        outcome = f"BUG {type(e).__name__}: {e}"
    print(json.dumps({"path": path, "outcome": outcome}), flush=True)
"""


def _huge_safetensors(seed: Path, out: Path) -> Path:
    header, body = _split_safetensors(seed.read_bytes())
    name = _tensor_names(header)[0]
    header[name] = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}  # 4 TiB
    out.write_bytes(_join_safetensors(json.dumps(header).encode(), body))
    return out


def _huge_npz(out: Path) -> Path:
    """An mlx-examples `.npz` whose `.npy` member header declares 16 GiB; the data is 64 bytes."""
    import numpy as np

    np.savez(out, **{"model.layers.0.self_attn.q_proj.lora_a": np.zeros((4, 4), np.float32)})
    with zipfile.ZipFile(out) as z:
        member = z.namelist()[0]
        data = z.read(member)
    data = _npy_shape(data)
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(member, data)
    return out


def _npy_shape(data: bytes) -> bytes:
    """Rewrite an `.npy` header's shape to (65536, 65536), keeping the header length."""
    start = data.index(b"{")
    length = struct.unpack("<H", data[8:10])[0]
    header = data[start : 10 + length].replace(b"(4, 4)", b"(65536, 65536)")
    return data[:8] + struct.pack("<H", len(header)) + header + data[10 + length :]


def _huge_gguf(seed: Path, out: Path) -> Path:
    """The GGUF seed with its first tensor's dimensions rewritten to 2^31 x 2^31."""
    from gguf import GGUFReader

    data = bytearray(seed.read_bytes())
    tensor = GGUFReader(seed).tensors[0]
    name = tensor.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    for i in range(n_dims):
        struct.pack_into("<Q", data, at + 4 + 8 * i, 2**31)
    out.write_bytes(bytes(data))
    return out


def _huge_pickle(out: Path) -> Path:
    """A torch zip checkpoint whose storage declares 2^31 elements (8 GiB) over 64 real bytes."""
    import pickletools

    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(16)}, out)
    with zipfile.ZipFile(out) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    pkl = members[pkl_name]
    ops = list(pickletools.genops(pkl))
    after_cpu = next(i for i, (_, arg, _) in enumerate(ops) if arg == "cpu")
    op, _, pos = next(o for o in ops[after_cpu:] if o[1] == 16)
    size = {"BININT1": 2, "BININT2": 3, "BININT": 5}[op.name]
    members[pkl_name] = pkl[:pos] + b"J" + struct.pack("<i", 2**31 - 1) + pkl[pos + size :]
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out


def test_huge_declared_shapes_stay_within_a_memory_limit(seeds: list[Seed], tmp_path: Path) -> None:
    """Files declaring TiB-sized tensors over a few real bytes, read with 1 GiB of address space to spare."""
    by_format = {s.format: s for s in seeds if s.name.startswith("written-")}
    files = [
        _huge_safetensors(by_format["kohya"].path, tmp_path / "kohya.safetensors"),
        _huge_safetensors(FIXTURES / "adapters/tiny-qv/adapter_model.safetensors", tmp_path / "raw.safetensors"),
        _huge_npz(tmp_path / "adapters.npz"),
        _huge_gguf(by_format["gguf"].path, tmp_path / "huge.gguf"),
        _huge_pickle(tmp_path / "adapter_model.pt"),
    ]
    peft = tmp_path / "peft"
    shutil.copytree(FIXTURES / "adapters/tiny-qv", peft)
    _huge_safetensors(peft / "adapter_model.safetensors", peft / "adapter_model.safetensors")
    run = subprocess.run(
        [sys.executable, "-c", _LIMITED_READER, str(BASE), *map(str, [*files, peft])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    outcomes = {Path(d["path"]).name: d["outcome"] for d in map(json.loads, run.stdout.splitlines())}
    assert len(outcomes) == len(files) + 1
    bugs = {name: o for name, o in outcomes.items() if o.startswith("BUG")}
    assert not bugs, bugs
    assert all(o.startswith("refused") for o in outcomes.values()), outcomes
