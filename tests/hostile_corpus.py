"""A seeded generator of hostile adapter files: what an attacker would hand to every reader.

`build(root, seed)` writes about 150 files (or adapter directories) in every format loractl
reads without pickle (PEFT, kohya, diffusers, mlx-lm safetensors and `.npz`, torchtune
safetensors, GGUF) and returns one `Case` per file. Each case is a lie a real file could tell:
counts, lengths and offsets far beyond the file's size, a million empty tensors, 99 MiB of
metadata, a sparse tensor of 2^31 elements, a 100 MB config, regular expressions built to
backtrack, numbers too big for a float, strings where numbers belong, layer indices larger
than any integer type, unknown dtypes, and names holding terminal escape sequences.

The generator builds the bytes itself (no writer of loractl's is trusted to produce them), so
the same seed gives the same files. `big` cases write tens of MB (or a sparse GB): they run in
the slow test only.
"""

from __future__ import annotations

import json
import random
import re
import struct
import zipfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = str(Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama")
HIDDEN, RANK, LAYERS = 64, 4, 2  # the base's width and layers (k/v are 32 wide); the adapters' rank
MiB = 1 << 20
ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m[/]\r"  # retitle the window, clear the screen, turn red; rich markup
BACKTRACK = ["(a|a)*(b|b)*(.*)*$!", "(.*.*)*x", "((q|q)+)+z", "(\\w+\\w+)+\\.!", "(.+)+(.+)+(.+)+$x"]
HUGE_INT = "1" + "0" * 400  # a JSON integer no float holds
HUGE_INDEX = "9" * 5000  # more digits than Python's int() accepts from a string (4,300)
TOLERABLE = {
    "ansi-name", "npz-ansi-name", "gguf-ansi-name", "lineage-wrong-types", "lineage-huge-numbers", "F8_E4M3-dtype",
    "F8_E5M2-dtype", "U64-dtype", "layer-index-20-digits", "gguf-record-wrong-types", "gguf-block-index-10^12",
    "gguf-block-index-2^40", "gguf-block-index-5000-digits", "gguf-architecture-int", "gguf-rope-heads-strings",
    "gguf-rope-heads-huge", "num_layers-huge-integer", "num_layers-string",
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One hostile input: the path a command is given, the read options it needs, what to expect.

    `accepted`: a lie a reader may tolerate (a hostile name, a mangled provenance record, an odd
    dtype): commands may succeed, but their text output carries no control character. Every other
    case must be refused with one line.
    """

    name: str
    path: Path
    options: tuple[str, ...] = ()
    accepted: bool = False
    big: bool = False
    seconds: float = 5.0  # the goal for any file of up to 100 MB


Want = Callable[[str, bool], bool]  # (case name, big) → build it?


# --- safetensors ---------------------------------------------------------------------------------


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None, *, pad: bytes = b""
) -> bytes:
    """A safetensors file from (dtype, shape, data) per name, laid out in order; `pad` ends the header."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(raw)) + raw + b"".join(d for _, _, d in tensors.values())


def _f32(rng: random.Random, *shape: int) -> tuple[str, list[int], bytes]:
    n = shape[0] * (shape[1] if len(shape) > 1 else 1)
    return "F32", list(shape), struct.pack(f"<{n}f", *(rng.uniform(-1, 1) for _ in range(n)))


def lora_pairs(
    rng: random.Random, key: Callable[[str, str], str], modules: list[str], rank: int = RANK
) -> dict[str, Any]:
    """A and B for each module of tiny-llama named `modules`, keyed by `key(module, role)`."""
    out: dict[str, Any] = {}
    for m in modules:
        width = HIDDEN // 2 if m.endswith(("k_proj", "v_proj")) else HIDDEN
        shapes = {"A": (rank, HIDDEN), "B": (width, rank)}
        for role, shape in shapes.items():
            out[key(m, role)] = _f32(rng, *(shape[::-1] if key is mlx_key else shape))  # mlx stores Aᵀ, Bᵀ
    return out


MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]
PEFT_ROLES = {"A": "lora_A.weight", "B": "lora_B.weight"}
MLX_ROLES = {"A": "lora_a", "B": "lora_b"}


def peft_key(module: str, role: str) -> str:
    return f"base_model.model.{module}.{PEFT_ROLES[role]}"


def kohya_key(module: str, role: str) -> str:
    return "lycoris_" + module.replace(".", "_") + {"A": ".lora_down.weight", "B": ".lora_up.weight"}[role]


def diffusers_key(module: str, role: str) -> str:
    return f"transformer.{module}.{PEFT_ROLES[role]}"


def torchtune_key(module: str, role: str) -> str:
    i, proj = module.split(".")[2], module.rsplit(".", 1)[1]
    return f"layers.{i}.attn.{proj}.lora_{role.lower()}.weight"


def mlx_key(module: str, role: str) -> str:
    return f"{module}.{MLX_ROLES[role]}"


PEFT_CONFIG = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
MLX_CONFIG = {"fine_tune_type": "lora", "num_layers": LAYERS, "lora_parameters": {"rank": RANK, "scale": 2.0}}


@dataclass(frozen=True)
class Layout:
    """Where a safetensors adapter lives: its key naming, a config beside it, the read options it needs."""

    name: str
    key: Callable[[str, str], str]
    weights: str  # file name; a directory holds it when `config` is set
    config: dict[str, Any] | None = None
    options: tuple[str, ...] = ()

    def write(self, root: Path, data: bytes, config: bytes | None = None) -> Path:
        """`root/weights` (a file layout) or the directory `root` holding weights and config."""
        root.mkdir()
        (root / self.weights).write_bytes(data)
        if self.config is None:
            return root / self.weights
        (root / "adapter_config.json").write_bytes(config if config is not None else json.dumps(self.config).encode())
        return root


LAYOUTS = [
    Layout("peft", peft_key, "adapter_model.safetensors", PEFT_CONFIG),
    Layout("kohya", kohya_key, "k.safetensors", options=("--from", "kohya", "--base", BASE)),
    Layout("diffusers", diffusers_key, "d.safetensors", options=("--from", "diffusers")),
    Layout("mlx", mlx_key, "adapters.safetensors", MLX_CONFIG),
    Layout(
        "torchtune", torchtune_key, "t.safetensors", options=("--from", "torchtune", "--alpha", "8", "--base", BASE)
    ),
]


def _header_lies(rng: random.Random, layout: Layout) -> Iterator[tuple[str, Callable[[], bytes], bool]]:
    """(name, file bytes, big) for every lie a safetensors header can tell, in `layout`'s names."""
    pairs = lora_pairs(rng, layout.key, MODULES)
    good = safetensors_bytes(pairs)
    (n,) = struct.unpack("<Q", good[:8])
    lie = rng.randrange(1, 1 << 30)
    yield "header-length-2^63", lambda: struct.pack("<Q", 2**63) + good[8:], False
    yield "header-length-past-end", lambda: struct.pack("<Q", n + lie) + good[8:], False
    yield "metadata-99MiB", lambda: safetensors_bytes(pairs, {"format": "pt", "junk": "x" * (99 * MiB)}), True
    yield "metadata-1.5M-keys", lambda: safetensors_bytes(pairs, {f"k{i}": "" for i in range(1_500_000)}), True
    yield "1M-zero-size-tensors", lambda: safetensors_bytes({**pairs, **_empties(1_000_000)}), True
    yield "600k-zero-rank-factors", lambda: safetensors_bytes({**pairs, **_zero_rank(layout, 300_000)}), True
    for dtype in ("F8_E4M3", "F8_E5M2", "U64"):
        yield f"{dtype}-dtype", lambda dtype=dtype: _retyped(pairs, layout, dtype), False
    yield "lineage-wrong-types", lambda: safetensors_bytes(pairs, _bad_record(rng)), False
    huge = {"loractl": json.dumps({"scales": {MODULES[0]: 0}}).replace("0}}", HUGE_INT + "}}")}
    yield "lineage-huge-numbers", lambda: safetensors_bytes(pairs, huge), False
    yield "shape-2^40", lambda: _reshaped(pairs, layout, [2**20, 2**20]), False
    for index in (HUGE_INDEX, str(2**64 + 1)):
        renamed = _renamed(pairs, index)
        yield f"layer-index-{len(index)}-digits", lambda renamed=renamed: safetensors_bytes(renamed), False
    yield "negative-offset", lambda: good.replace(b'"data_offsets": [0, ', b'"data_offsets": [-8, ', 1), False


def _empties(n: int) -> dict[str, Any]:
    return {str(i): ("F32", [0], b"") for i in range(n)}


def _zero_rank(layout: Layout, n: int) -> dict[str, Any]:
    """`n` modules of rank 0: A (0, in) and B (out, 0), no data."""
    modules = (f"model.layers.{i}.self_attn.q_proj" for i in range(n))
    return {layout.key(m, r): ("F32", [0, HIDDEN] if r == "A" else [HIDDEN, 0], b"") for m in modules for r in "AB"}


def _retyped(pairs: dict[str, Any], layout: Layout, dtype: str) -> bytes:
    """The first A stored in `dtype` (one byte per element for F8: the data is cut to fit)."""
    key = layout.key(MODULES[0], "A")
    _, shape, data = pairs[key]
    size = {"F8_E4M3": 1, "F8_E5M2": 1, "U64": 8}[dtype]
    n = shape[0] * shape[1]
    return safetensors_bytes({**pairs, key: (dtype, shape, (data * 2)[: n * size])})


def _reshaped(pairs: dict[str, Any], layout: Layout, shape: list[int]) -> bytes:
    key = layout.key(MODULES[0], "A")
    raw = safetensors_bytes(pairs)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[key]["shape"] = shape
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def _renamed(pairs: dict[str, Any], index: str) -> dict[str, Any]:
    """Layer 0 renamed to layer `index`, in every format's spelling (`.layers.0.`, `_layers_0_`, `layers.0.`)."""
    return {re.sub(r"(^|[._])layers([._])0\2", rf"\1layers\g<2>{index}\2", k): v for k, v in pairs.items()}


def _bad_record(rng: random.Random) -> dict[str, str]:
    """loractl's provenance record with every field of the wrong type."""
    value = rng.choice([[1, 2], "text", 7, {"a": None}, None, True])
    record = {
        "version": "one",
        "content_hash": [1],
        "lineage": [{"op": 5, "params": "x", "parents": 3, "time": [], "metrics": "m"}, "step", 7],
        "base": {"model": 5, "fingerprint": {"x": 1}, "views": [1, 2]},
        "scales": {MODULES[0]: "x", MODULES[1]: value},
        "fan_in_fan_out": [1],
        "padded_bias": 12,
    }
    return {"format": "pt", "loractl": json.dumps(record)}


def _ansi_pairs(rng: random.Random, layout: Layout) -> dict[str, Any]:
    """A well-formed adapter whose last module name carries escape sequences."""
    modules = [*MODULES[:-1], MODULES[-1].replace("v_proj", f"v_proj{ESC}")]
    return lora_pairs(rng, layout.key, modules)


def safetensors_cases(root: Path, rng: random.Random, want: Want) -> Iterator[Case]:
    for layout in LAYOUTS:
        for name, data, big in _header_lies(rng, layout):
            if not want(f"{layout.name}/{name}", big):
                continue
            path = layout.write(root / f"{layout.name}-{name}", data())
            yield Case(f"{layout.name}/{name}", path, layout.options, accepted=name in TOLERABLE, big=big)
        if want(f"{layout.name}/sparse-2^31-elements", True):
            yield Case(
                f"{layout.name}/sparse-2^31-elements",
                _sparse(root / f"{layout.name}-sparse", layout, rng),
                layout.options,
                big=True,
                seconds=30,  # 4 GiB apparent size: past the 5 s goal's 100 MB (`validate` scans the data that is there)
            )
        ansi = layout.write(root / f"{layout.name}-ansi", safetensors_bytes(_ansi_pairs(rng, layout)))
        yield Case(f"{layout.name}/ansi-name", ansi, layout.options, accepted=True)
    long = lora_pairs(
        rng, kohya_key, ["_".join(["model"] * 165)]
    )  # without --base, every split of 1,000 characters is tried
    path = LAYOUTS[1].write(root / "kohya-165-segment-name", safetensors_bytes(long))
    yield Case("kohya/165-segment-name", path, ("--from", "kohya"), accepted=True)


def _sparse(root: Path, layout: Layout, rng: random.Random) -> Path:
    """A rank-16 module whose A is (16, 2^27) F16 (2^31 elements, 4 GiB) and a hole: a few KB on disk."""
    pairs = {**lora_pairs(rng, layout.key, MODULES[1:]), **lora_pairs(rng, layout.key, MODULES[:1], rank=16)}
    key = layout.key(MODULES[0], "A")
    hole = 2 * 2**31
    data = safetensors_bytes({**pairs, key: ("F16", [2**27, 16] if layout.key is mlx_key else [16, 2**27], b"")})
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    offset = 0
    for name in pairs:  # the tiling again, with the hole's true length
        length = hole if name == key else header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [offset, offset + length]
        offset += length
    raw = json.dumps(header).encode()
    path = layout.write(root, struct.pack("<Q", len(raw)) + raw)
    with (path / layout.weights if path.is_dir() else path).open("r+b") as f:
        f.seek(0, 2)
        for name, (_, _, tensor) in pairs.items():
            if name == key:
                f.seek(hole, 1)
            else:
                f.write(tensor)
    return path


# --- JSON configs ------------------------------------------------------------------------------


def _config_lies(
    rng: random.Random, base: dict[str, Any], nested: str | None
) -> Iterator[tuple[str, Callable[[], bytes], bool]]:
    """(name, config bytes, big) for each hostile value in a PEFT (`nested` None) or mlx config."""

    def with_value(key: str, value: str) -> bytes:
        doc = json.dumps(base)
        target = f'"{key}": '
        at = doc.index(target) + len(target) if target in doc else None
        if at is None:  # add the key to the innermost object that should hold it
            return (doc[:-1] + f', "{key}": {value}}}').encode()
        end = min(i for i in (doc.find(",", at), doc.find("}", at)) if i >= 0)
        return (doc[:at] + value + doc[end:]).encode()

    alpha, rank = ("scale", "rank") if nested else ("lora_alpha", "r")
    doc = json.dumps(base).encode()
    yield "config-100MB", lambda: doc[:-1] + b', "pad": "' + b" " * (100 * MiB) + b'"}', True
    yield "config-100MB-whitespace", lambda: b" " * (100 * MiB) + doc, True
    values = {
        f"{alpha}-huge-integer": (alpha, HUGE_INT),
        f"{alpha}-1e400": (alpha, "1e400"),
        f"{rank}-huge-integer": (rank, HUGE_INT),
        f"{alpha}-string": (alpha, json.dumps(rng.choice(["8", "NaN", "x" * 100]))),
    }
    if nested:
        values |= {"num_layers-huge-integer": ("num_layers", HUGE_INT), "num_layers-string": ("num_layers", '"all"')}
    else:
        for i, pattern in enumerate(BACKTRACK):
            values |= {f"{f}-backtrack-{i}": (f, json.dumps({pattern: 8})) for f in ("rank_pattern", "alpha_pattern")}
        many = {f"model.layers.{i}.self_attn.x_proj": 4 for i in range(200_000)}
        values |= {
            "alpha_pattern-huge-integer": ("alpha_pattern", f'{{"q_proj": {HUGE_INT}}}'),
            "rank_pattern-200k-keys": ("rank_pattern", json.dumps(many)),
            "rank_pattern-5M-key": ("rank_pattern", json.dumps({"q" * 5_000_000: 4})),
        }
    for name, (key, value) in values.items():
        yield name, lambda key=key, value=value: with_value(key, value), False
    yield "deep-nesting", lambda: b"[" * 200_000 + b"]" * 200_000, False


def config_cases(root: Path, rng: random.Random, want: Want) -> Iterator[Case]:
    for layout in (LAYOUTS[0], LAYOUTS[3]):
        assert layout.config is not None
        pairs = safetensors_bytes(lora_pairs(rng, layout.key, MODULES))
        nested = "lora_parameters" if layout.name == "mlx" else None
        for name, config, big in _config_lies(rng, layout.config, nested):
            if not want(f"{layout.name}/{name}", big):
                continue
            path = layout.write(root / f"{layout.name}-{name}", pairs, config())
            yield Case(f"{layout.name}/{name}", path, layout.options, accepted=name in TOLERABLE, big=big)


# --- mlx-examples .npz ---------------------------------------------------------------------------


def _npy(shape: tuple[int, ...], data: bytes, descr: str = "<f4") -> bytes:
    """An `.npy` member: the version 1.0 header, then `data` (which may hold less than declared)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def _npz(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return path


def _npz_members(rng: random.Random, modules: list[str]) -> dict[str, bytes]:
    out = {}
    for key, (_, shape, data) in lora_pairs(rng, mlx_key, modules).items():
        out[key] = _npy(tuple(shape), data)
    return out


def npz_cases(root: Path, rng: random.Random, want: Want) -> Iterator[Case]:
    opts = ("--scale", "2")
    members = _npz_members(rng, MODULES)
    first = next(iter(members))
    lies: dict[str, dict[str, bytes]] = {
        "npz-huge-shape": {**members, first: _npy((2**31, 2**31), b"\0" * 64)},
        "npz-object-dtype": {**members, first: _npy((4, 4), b"\0" * 64, "|O")},
        "npz-unknown-dtype": {**members, first: _npy((4, 4), b"\0" * 64, "<V7")},
        "npz-bad-header": {**members, first: b"\x93NUMPY\x01\x00\xff\xff{'descr': "},
        "npz-huge-layer-index": {k.replace(".layers.0.", f".layers.{HUGE_INDEX}."): v for k, v in members.items()},
        "npz-ansi-name": _npz_members(rng, [*MODULES[:-1], MODULES[-1] + ESC]),
    }
    for name, content in lies.items():
        yield Case(f"npz/{name}", _npz(root / f"{name}.npz", content), opts, accepted=name in TOLERABLE)
    if want("npz/npz-200k-members", True):
        many = {**members, **{f"x.{i}.lora_a": _npy((1, 1), b"\0" * 4) for i in range(200_000)}}
        yield Case("npz/npz-200k-members", _npz(root / "many.npz", many), opts, big=True)
    if want("npz/zip-bomb-400MB", True):
        bomb = {**members, first: _npy((RANK, 100 * MiB), b"\0" * (400 * MiB))}
        yield Case("npz/zip-bomb-400MB", _npz(root / "bomb.npz", bomb, compress=True), opts, big=True)


# --- GGUF ----------------------------------------------------------------------------------------

_GGUF_TYPES = {int: (11, "<q"), float: (6, "<f"), bool: (7, "<?")}


def _gguf_str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(v: Any) -> bytes:
    if isinstance(v, (str, bytes)):
        return struct.pack("<I", 8) + _gguf_str(v)
    if isinstance(v, list):
        return struct.pack("<I", 9) + struct.pack("<IQ", 8, len(v)) + b"".join(_gguf_str(str(x)) for x in v)
    code, fmt = _GGUF_TYPES[type(v)]
    return struct.pack("<I", code) + struct.pack(fmt, v)


@dataclass
class Gguf:
    """A GGUF v3 adapter built field by field, so that every count and offset can lie."""

    kv: dict[str, Any]
    tensors: dict[str, tuple[list[int], bytes]]  # numpy shape, F32 data
    n_tensors: int | None = None
    n_kv: int | None = None
    dims: dict[str, list[int]] | None = None  # `ne` written instead of the true one
    offsets: dict[str, int] | None = None

    def bytes(self) -> bytes:
        head = b"GGUF" + struct.pack("<IQQ", 3, self.n_tensors or len(self.tensors), self.n_kv or len(self.kv))
        head += b"".join(_gguf_str(k) + _gguf_value(v) for k, v in self.kv.items())
        offset, body = 0, b""
        for name, (shape, data) in self.tensors.items():
            ne = (self.dims or {}).get(name, list(reversed(shape)))
            at = (self.offsets or {}).get(name, offset)
            head += _gguf_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, 0, at)
            body += data + b"\0" * (-len(data) % 32)
            offset += len(data) + (-len(data) % 32)
        return head + b"\0" * (-len(head) % 32) + body


def _gguf_adapter(rng: random.Random, stems: list[str], **kv: Any) -> Gguf:
    fields = {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
    fields |= {"adapter.lora.alpha": 8.0, **kv}
    tensors = {}
    for stem in stems:
        width = HIDDEN // 2 if "attn_v" in stem or "attn_k" in stem else HIDDEN
        tensors[f"{stem}.weight.lora_a"] = ([RANK, HIDDEN], _f32(rng, RANK, HIDDEN)[2])
        tensors[f"{stem}.weight.lora_b"] = ([width, RANK], _f32(rng, width, RANK)[2])
    return Gguf(fields, tensors)


STEMS = [f"blk.{i}.attn_{p}" for i in range(LAYERS) for p in ("q", "v")]


def gguf_cases(root: Path, rng: random.Random, want: Want) -> Iterator[Case]:
    def make(**kv: Any) -> Gguf:
        return _gguf_adapter(rng, STEMS, **kv)

    first = f"{STEMS[0]}.weight.lora_a"
    lies: dict[str, Gguf] = {
        "gguf-tensor-count-2^62": Gguf(make().kv, make().tensors, n_tensors=2**62),
        "gguf-kv-count-2^62": Gguf(make().kv, make().tensors, n_kv=2**62),
        "gguf-dims-2^31": Gguf(make().kv, make().tensors, dims={first: [2**31, 2**31]}),
        "gguf-ndims-huge": Gguf(make().kv, make().tensors, dims={first: [4] * 200}),
        "gguf-offset-past-end": Gguf(make().kv, make().tensors, offsets={first: 2**40}),
        "gguf-rope-heads-strings": make(**{"loractl.rope_heads": ["four", "two"]}),
        "gguf-rope-heads-huge": make(**{"loractl.rope_heads": [HUGE_INT, "2"]}),
        "gguf-alpha-string": make(**{"adapter.lora.alpha": "eight"}),
        "gguf-architecture-int": make(**{"general.architecture": 7}),
        "gguf-modules-record-wrong": make(**{"loractl.modules": "[1, 2]"}),
        "gguf-record-wrong-types": make(**{"loractl.record": _bad_record(rng)["loractl"]}),
        "gguf-block-index-10^12": _gguf_adapter(rng, [s.replace("blk.1.", f"blk.{10**12}.") for s in STEMS]),
        "gguf-block-index-2^40": _gguf_adapter(rng, [s.replace("blk.0.", f"blk.{2**40}.") for s in STEMS]),
        "gguf-block-index-5000-digits": _gguf_adapter(rng, [s.replace("blk.0.", f"blk.{HUGE_INDEX}.") for s in STEMS]),
    }
    for name, gguf in lies.items():
        path = root / f"{name}.gguf"
        path.write_bytes(gguf.bytes())
        yield Case(f"gguf/{name}", path, ("--base", BASE) if "rope" not in name else (), accepted=name in TOLERABLE)
    kv_string = make().bytes().replace(_gguf_str("general.type"), struct.pack("<Q", 2**60) + b"general.type", 1)
    (root / "gguf-key-length-2^60.gguf").write_bytes(kv_string)
    yield Case("gguf/gguf-key-length-2^60", root / "gguf-key-length-2^60.gguf")
    array = (
        make(**{"tokenizer.ggml.tokens": ["a"]})
        .bytes()
        .replace(struct.pack("<IQ", 8, 1), struct.pack("<IQ", 8, 2**61), 1)
    )
    (root / "gguf-array-length-2^61.gguf").write_bytes(array)
    yield Case("gguf/gguf-array-length-2^61", root / "gguf-array-length-2^61.gguf")
    ansi = _gguf_adapter(rng, [*STEMS[:-1], STEMS[-1] + ESC])
    (root / "gguf-ansi.gguf").write_bytes(ansi.bytes())
    yield Case("gguf/gguf-ansi-name", root / "gguf-ansi.gguf", ("--base", BASE), accepted=True)


# --- the corpus ----------------------------------------------------------------------------------

FAMILIES = (safetensors_cases, config_cases, npz_cases, gguf_cases)


def build(root: Path, seed: int = 0, *, big: bool = True, names: Collection[str] | None = None) -> list[Case]:
    """Write the corpus under `root` (created; empty if it exists); `big=False` skips the large files,
    `names` keeps only the cases named (big ones included), and builds no large file it does not keep."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def want(name: str, is_big: bool) -> bool:
        return name in names if names is not None else big or not is_big

    return [case for family in FAMILIES for case in family(root, rng, want) if want(case.name, case.big)]
