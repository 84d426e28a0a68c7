"""Merging into K-quant and IQ GGUF bases (issue 24 item 1), and split GGUF bases (item 2).

Each requantized tensor must be the bytes llama.cpp's own `ggml_quantize_chunk` gives for the same
float tensor, called here through ctypes independently of loractl's `bases/ggml_quant.py`; the
float tensor must be W + ΔW against a dense float64 reference. Tiny tensors (rows of 256, the
K-quant block) keep these in the default run.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runner import run
from llama_adapters import llama_cpp_permute

from loractl import merge
from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.bases.gguf import GgufBase
from loractl.errors import FormatError, ShapeMismatchError
from loractl.formats import save_adapter

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64
KV = HIDDEN // HEADS * KV_HEADS
SHAPES = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
for _i in range(2):
    SHAPES |= {f"blk.{_i}.attn_norm.weight": (HIDDEN,), f"blk.{_i}.attn_q.weight": (HIDDEN, HIDDEN),
               f"blk.{_i}.attn_k.weight": (KV, HIDDEN), f"blk.{_i}.attn_v.weight": (KV, HIDDEN),
               f"blk.{_i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{_i}.ffn_norm.weight": (HIDDEN,),
               f"blk.{_i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{_i}.ffn_up.weight": (FFN, HIDDEN),
               f"blk.{_i}.ffn_down.weight": (HIDDEN, FFN)}  # fmt: skip
ADAPTED = {  # module → its GGUF tensor and the heads llama.cpp permuted its rows with
    "model.layers.0.self_attn.q_proj": ("blk.0.attn_q.weight", (HEADS, HEADS)),
    "model.layers.0.self_attn.k_proj": ("blk.0.attn_k.weight", (HEADS, KV_HEADS)),
    "model.layers.1.self_attn.v_proj": ("blk.1.attn_v.weight", None),
    "model.layers.1.mlp.down_proj": ("blk.1.ffn_down.weight", None),
}


class Reference:
    """llama.cpp's quantizer through its own library handle (llama_cpp._ggml), not loractl's module."""

    def __init__(self) -> None:
        from llama_cpp import _ggml

        self.lib = _ggml.libggml
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_row_size.restype = ctypes.c_size_t

    def quantize(self, values: np.ndarray, kind: str, imatrix: np.ndarray | None = None) -> bytes:
        t = int(gguf.GGMLQuantizationType[kind])
        src = np.ascontiguousarray(values, dtype=np.float32)
        rows, n = src.reshape(-1, src.shape[-1]).shape
        out = ctypes.create_string_buffer(rows * self.lib.ggml_row_size(t, ctypes.c_int64(n)))
        w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).ctypes.data_as(ctypes.c_void_p)
        size = self.lib.ggml_quantize_chunk(t, src.ctypes.data_as(ctypes.c_void_p), out, ctypes.c_int64(0),
                                            ctypes.c_int64(rows), ctypes.c_int64(n), w)  # fmt: skip
        assert size == len(out.raw)
        return out.raw


REF = Reference()


def importance(name: str) -> np.ndarray:
    """The column weights of `name`; the files below store them scaled by powers of two, so that llama.cpp's
    division (sum / count, values / ncall) gives them back exactly."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.random(SHAPES[name][-1]) * 2 + 0.05).astype(np.float32)


def write_model(path: Path, kind: str, *, imatrix: bool = False, split: int = 1) -> Path:
    """A tiny llama GGUF: the adapted tensors in `kind` (bytes from llama.cpp's quantizer), the rest F32;
    `split` > 1 writes it in llama.cpp's split layout, as convert_hf_to_gguf.py --split-max-tensors does."""
    rng = np.random.default_rng(0)
    adapted = {t for t, _ in ADAPTED.values()}
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=-(-len(SHAPES) // split) if split > 1 else 0)
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_embedding_length(HIDDEN)
    for name, shape in SHAPES.items():
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if name in adapted and kind != "F32":
            raw = REF.quantize(data, kind, importance(name) if imatrix else None)
            w.add_tensor(
                name, np.frombuffer(raw, np.uint8).reshape(shape[0], -1), raw_dtype=gguf.GGMLQuantizationType[kind]
            )
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path if split == 1 else path.with_name(f"{path.stem}-00001-of-{split:05d}.gguf")


def write_imatrix_gguf(path: Path, names: list[str]) -> Path:
    """llama-imatrix's GGUF layout: per weight `.in_sum2` (n_per_row × 1) and `.counts` (1 × 1)."""
    w = gguf.GGUFWriter(path, None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["test"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in names:
        w.add_tensor(f"{name}.in_sum2", (importance(name) * 8).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[8.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_imatrix_dat(path: Path, names: list[str]) -> Path:
    """llama-imatrix's legacy layout: values stored × ncall, divided by ncall when read."""
    out = struct.pack("<i", len(names))
    for name in names:
        values = importance(name) * np.float32(4)
        out += struct.pack(f"<i{len(name)}sii", len(name), name.encode(), 4, values.size) + values.tobytes()
    path.write_bytes(out + struct.pack("<i", 3))
    return path


def adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, (key, _) in ADAPTED.items():
        out, inp = SHAPES[key]
        mods[name] = LoraModule(A=torch.randn(8, inp, generator=g) * 0.05, B=torch.randn(out, 8, generator=g) * 0.05,
                                scale=2.0, alpha=16.0)  # fmt: skip
    return Adapter(modules=mods, meta=AdapterMeta())


def tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def merged_floats(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """The float tensors loractl hands to requantization, by name (recorded from `GgufBase.encode_rows`, its
    blocks of rows put together in order)."""
    seen: dict[str, np.ndarray] = {}
    encode = GgufBase.encode_rows

    def record(self: GgufBase, key: str, start: int, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        rows = seen.get(key, values.numpy()[:0])
        assert rows.shape[0] == start  # blocks come in row order, each once
        seen[key] = np.concatenate([rows, values.numpy()])
        return encode(self, key, start, values)

    monkeypatch.setattr(GgufBase, "encode_rows", record)
    return seen


CASES = [("Q2_K", False), ("Q3_K", False), ("Q4_K", False), ("Q5_K", False), ("Q6_K", False), ("IQ4_NL", False),
         ("IQ4_XS", False), ("IQ2_XXS", True), ("IQ3_S", True), ("Q4_K", True), ("Q4_0", True)]  # fmt: skip


@pytest.mark.parametrize(("kind", "with_imatrix"), CASES)
def test_requantized_bytes_are_llama_cpps(
    kind: str, with_imatrix: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = write_model(tmp_path / "base.gguf", kind, imatrix=with_imatrix)
    a = adapter()
    save_adapter(a, tmp_path / "peft", format="peft")
    imatrix = write_imatrix_gguf(tmp_path / "imatrix.gguf", list(SHAPES)) if with_imatrix else None
    floats = merged_floats(monkeypatch)
    report = merge(base, [tmp_path / "peft"], tmp_path / "out.gguf", imatrix=imatrix)
    before, after = tensors(base), tensors(tmp_path / "out.gguf")
    for name, (key, heads) in ADAPTED.items():
        assert after[key].tensor_type.name == kind
        w = gguf.quants.dequantize(before[key].data, before[key].tensor_type).astype(np.float64)
        delta = a.modules[name].delta_weight(torch.float64)
        want = w + (llama_cpp_permute(delta, *heads) if heads else delta).numpy()
        assert np.abs(floats[key] - want).max() <= 1e-6 * np.abs(want).max(), name  # the float tensor is W + ΔW
        expected = REF.quantize(floats[key], kind, importance(key) if with_imatrix else None)
        assert after[key].data.tobytes() == expected, name  # byte for byte llama.cpp's
    for key in SHAPES.keys() - {k for k, _ in ADAPTED.values()}:
        assert before[key].data.tobytes() == after[key].data.tobytes(), key
    by_type = report.rounding_by_type
    assert set(by_type) == {kind} and by_type[kind]["modules"] == len(ADAPTED)
    assert 0 <= by_type[kind]["survives_worst"] <= by_type[kind]["survives_median"] <= 1


def test_every_tensor_keeps_its_own_type(tmp_path: Path) -> None:
    """A mixed file (as Q4_K_M is: Q4_K and Q6_K tensors) keeps each tensor's type; the report groups by type."""
    base = write_model(tmp_path / "base.gguf", "Q4_K")
    mixed = tmp_path / "mixed.gguf"
    reader = gguf.GGUFReader(base)
    w = gguf.GGUFWriter(mixed, "llama")
    for key, value in ((k, f.contents()) for k, f in reader.fields.items() if k.startswith("llama.")):
        w.add_uint32(key, value)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "blk.1.attn_v.weight":
            raw = REF.quantize(values, "Q6_K")
            w.add_tensor(t.name, np.frombuffer(raw, np.uint8).reshape(values.shape[0], -1),
                         raw_dtype=gguf.GGMLQuantizationType.Q6_K)  # fmt: skip
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    report = merge(mixed, [tmp_path / "peft"], tmp_path / "out.gguf")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    assert kinds == {t.name: t.tensor_type.name for t in gguf.GGUFReader(mixed).tensors}
    assert kinds["blk.1.attn_v.weight"] == "Q6_K" and kinds["blk.0.attn_q.weight"] == "Q4_K"
    assert set(report.rounding_by_type) == {"Q4_K", "Q6_K"}
    assert report.rounding_by_type["Q6_K"]["modules"] == 1


def test_imatrix_formats_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """IQ2_XXS needs an importance matrix: refused without --imatrix (with that hint), merged with it; the
    GGUF and legacy .dat layouts give the same weights, hence the same bytes."""
    base = write_model(tmp_path / "base.gguf", "IQ2_XXS", imatrix=True)
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    out = tmp_path / "out.gguf"
    code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(out))
    assert code == 1 and "IQ2_XXS" in err and "--imatrix" in err and not out.exists()
    names = list(SHAPES)
    g = write_imatrix_gguf(tmp_path / "imatrix.gguf", names)
    d = write_imatrix_dat(tmp_path / "imatrix.dat", names)
    code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(out), "--imatrix", str(g))
    assert code == 0, err
    merge(base, [tmp_path / "peft"], tmp_path / "dat.gguf", imatrix=d)
    assert out.read_bytes() == (tmp_path / "dat.gguf").read_bytes()

    partial = write_imatrix_gguf(tmp_path / "partial.gguf", ["blk.0.attn_q.weight"])
    with pytest.raises(ShapeMismatchError, match="has no entry"):
        merge(base, [tmp_path / "peft"], tmp_path / "p.gguf", imatrix=partial)
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00\xff\xff")
    with pytest.raises(FormatError, match="not an importance matrix"):
        merge(base, [tmp_path / "peft"], tmp_path / "p.gguf", imatrix=tmp_path / "junk.dat")
    code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(tmp_path / "m"),
                       "--imatrix", str(base))  # fmt: skip
    assert code != 0 and "not an importance matrix" in err and "hint:" in err
    assert not (tmp_path / "p.gguf").exists() and not (tmp_path / "m").exists()


def test_missing_llama_cpp_is_named_with_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loractl.bases import ggml_quant

    base = write_model(tmp_path / "base.gguf", "Q4_K")
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    monkeypatch.setattr(ggml_quant, "_library_path", lambda: None)
    ggml_quant.library.cache_clear()
    try:
        code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(tmp_path / "o.gguf"))
    finally:
        ggml_quant.library.cache_clear()
    assert code == 2 and "loractl[gguf-quant]" in err and not (tmp_path / "o.gguf").exists()


def test_vanishing_update_is_reported_per_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A small update on Q2_K tensors mostly disappears in requantization: the report says how much of ΔW
    survives on that type, with ΔW's and the requantization noise's size, and the way out."""
    base = write_model(tmp_path / "base.gguf", "Q2_K")
    a = adapter()
    tiny = Adapter(modules={k: LoraModule(A=m.A * 0.02, B=m.B, scale=m.scale, alpha=m.alpha)
                            for k, m in a.modules.items()}, meta=a.meta)  # fmt: skip
    save_adapter(tiny, tmp_path / "peft", format="peft")
    code, out, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(tmp_path / "o.gguf"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    q2 = doc["rounding_by_type"]["Q2_K"]
    assert q2["survives_worst"] < 0.5
    assert "Q2_K" in err and "survives" in err and "F16" in err and "step" in err


def test_split_gguf_is_merged_shard_for_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model in 3 shards merges like the same model in one file, and is written in 3 shards again."""
    whole = write_model(tmp_path / "whole.gguf", "Q4_K")
    first = write_model(tmp_path / "split.gguf", "Q4_K", split=3)
    assert first.name == "split-00001-of-00003.gguf"
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    merge(whole, [tmp_path / "peft"], tmp_path / "want.gguf")
    report = merge(first, [tmp_path / "peft"], tmp_path / "out.gguf")
    files = [tmp_path / f"out-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert report.shards == tuple(str(f) for f in files) and report.output == files[0]  # the one MergeReport
    want = tensors(tmp_path / "want.gguf")
    seen = set()
    for i, (shard, source) in enumerate(zip(files, sorted(tmp_path.glob("split-*")), strict=True)):
        r, s = gguf.GGUFReader(shard), gguf.GGUFReader(source)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == 3
        assert [t.name for t in r.tensors] == [t.name for t in s.tensors]
        assert ("loractl.merge" in r.fields) == (i == 0)  # the provenance goes with the metadata, in shard 1
        for t in r.tensors:
            assert t.data.tobytes() == want[t.name].data.tobytes(), t.name
            seen.add(t.name)
    assert seen == set(SHAPES)
    named = tmp_path / "named-00001-of-00003.gguf"  # -o may name the first shard
    code, _, err = run(capsys, "merge", str(first), str(tmp_path / "peft"), "-o", str(named))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("named-*")) == [f"named-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]

    second = tmp_path / "split-00002-of-00003.gguf"
    with pytest.raises(FormatError, match="shard 2 of a model split in 3"):
        merge(second, [tmp_path / "peft"], tmp_path / "x.gguf")
    second.rename(tmp_path / "gone.gguf")
    with pytest.raises(FormatError, match="shard 2 of 3 is missing"):
        merge(first, [tmp_path / "peft"], tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x*"))


# Through llama.cpp, on SmolLM2 quantized by llama.cpp itself (cached after the first run).
TOKENS = [1, 504, 3458, 282, 4287, 314, 253, 1345, 30, 378, 2106, 4704, 17]
PROMPTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
           "def add(a, b):\n    return a + b\n", "Photosynthesis turns light, water and carbon dioxide into sugar."]  # fmt: skip


def smollm2_adapter(model_dir: Path, layers: range, std: float) -> Adapter:
    """A rank-8 LoRA on q, k, v and down_proj (Q4_K_M stores some down_proj and v as Q6_K: both types are hit)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads, kv, ffn = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                  "intermediate_size"))  # fmt: skip
    kv_dim = hidden // heads * kv
    g = torch.Generator().manual_seed(0)
    mods = {}
    for layer in layers:
        for leaf, out, inp in (("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", kv_dim, hidden),
                               ("self_attn.v_proj", kv_dim, hidden), ("mlp.down_proj", hidden, ffn)):  # fmt: skip
            a, b = torch.randn(8, inp, generator=g) / inp**0.5, torch.randn(out, 8, generator=g) * std
            mods[f"model.layers.{layer}.{leaf}"] = LoraModule(A=a, B=b, scale=2.0, alpha=16.0)
    return Adapter(modules=mods, meta=AdapterMeta())


@pytest.fixture(scope="module")
def smollm2_ggufs(smollm2: Path) -> dict[str, tuple[Path, Path | None]]:
    """SmolLM2 as llama.cpp's converter writes it (F32) and as llama_model_quantize quantizes that: Q4_K_M,
    Q5_K_M, Q6_K, and IQ4_XS with an importance matrix (ours: `activation_imatrix`, llama-imatrix's statistic)."""
    from llama_cpp_tools import activation_imatrix, hf_to_gguf, llama_quantize, write_imatrix

    f32 = hf_to_gguf(smollm2, "f32")
    imatrix_file = f32.with_name(f32.name.replace(".f32.", ".imatrix."))
    if not imatrix_file.is_file():
        tmp = imatrix_file.with_name(imatrix_file.name + f".tmp{os.getpid()}")
        write_imatrix(tmp, activation_imatrix(smollm2, PROMPTS), count=len(PROMPTS))
        tmp.rename(imatrix_file)
    from loractl.bases.gguf_imatrix import read_imatrix

    out: dict[str, tuple[Path, Path | None]] = {"F32": (f32, None)}
    for name in ("Q4_K_M", "Q5_K_M", "Q6_K"):
        out[name] = (llama_quantize(f32, name), None)
    out["IQ4_XS"] = (llama_quantize(f32, "IQ4_XS", read_imatrix(imatrix_file)), imatrix_file)
    return out


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", ["Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS"])
def test_llama_cpp_runs_the_merge_into_smollm2_quantized_by_llama_cpp(
    name: str, smollm2: Path, smollm2_ggufs: dict[str, tuple[Path, Path | None]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each requantized tensor is llama.cpp's bytes for the merged floats; and what requantizing costs is
    smaller than what quantizing cost the base: llama.cpp's logits on the merged file are closer to the float
    merge's than the quantized base's are to its F32 original. The float merge is W_q + ΔW without
    requantizing, as llama.cpp computes it: the quantized base with the adapter applied at run time (a
    float32 B·A beside the same W_q kernels, so llama.cpp's rounding of the activations, common to both,
    is not counted as the merge's)."""
    from llama_cpp_tools import ggml_quantize_chunk, logits

    from loractl.bases.gguf_imatrix import read_imatrix
    from loractl.formats.options import WriteOptions

    f32, _ = smollm2_ggufs["F32"]
    quant, imatrix = smollm2_ggufs[name]
    a = smollm2_adapter(smollm2, range(0, 30, 3), 0.05)
    save_adapter(a, tmp_path / "peft", format="peft")
    save_adapter(a, tmp_path / "lora.gguf", format="gguf", options=WriteOptions(base=smollm2))
    floats = merged_floats(monkeypatch)
    report = merge(quant, [tmp_path / "peft"], tmp_path / "merged.gguf", imatrix=imatrix)
    weights = read_imatrix(imatrix) if imatrix else {}
    stored = tensors(tmp_path / "merged.gguf")
    kinds = {stored[k].tensor_type.name for k in floats}
    assert kinds == set(report.rounding_by_type) and kinds & {"Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"}
    for key, values in floats.items():
        kind = stored[key].tensor_type.name
        assert stored[key].data.tobytes() == ggml_quantize_chunk(values, kind, weights.get(key)), key
    base_f, base_q = logits(f32, TOKENS), logits(quant, TOKENS)
    want, got = logits(quant, TOKENS, lora=tmp_path / "lora.gguf"), logits(tmp_path / "merged.gguf", TOKENS)
    requantizing, quantizing = np.linalg.norm(got - want), np.linalg.norm(base_q - base_f)
    carried = 1 - requantizing / np.linalg.norm(base_q - want)
    print(f"\n{name}: requantization error {requantizing:.4g}, base quantization error {quantizing:.4g}, "
          f"adapter effect {np.linalg.norm(want - base_q):.4g}, nearer by {carried:.0%}, "
          f"survives {report.rounding_by_type}")  # fmt: skip
    assert requantizing < quantizing, (requantizing, quantizing)
    # The merged file is nearer the float merge than the unmerged base is (measured 2026-12-07: 29% nearer for
    # IQ4_XS, 36% Q4_K_M, 43% Q5_K_M, 61% Q6_K: llama.cpp's logits amplify the requantization noise).
    assert carried > 0.2, carried


@pytest.mark.interop
def test_llama_cpp_loads_a_merged_split_gguf(tiny_llama: Path, tmp_path: Path) -> None:
    """A split GGUF written by llama.cpp's converter (--split-max-tensors), merged: llama.cpp loads the merged
    shards and answers exactly as from the same merge into the unsplit file."""
    from llama_cpp_tools import hf_to_gguf, hf_to_split_gguf, logits

    first = hf_to_split_gguf(tiny_llama, "q8_0", 8)
    assert len(list(first.parent.glob("*.gguf"))) > 2
    save_adapter(smollm2_adapter(tiny_llama, range(2), 0.3), tmp_path / "peft", format="peft")
    report = merge(first, [tmp_path / "peft"], tmp_path / "merged.gguf")
    assert len(report.shards) == len(list(first.parent.glob("*.gguf")))
    merge(hf_to_gguf(tiny_llama, "q8_0"), [tmp_path / "peft"], tmp_path / "whole.gguf")
    got = logits(Path(report.shards[0]), TOKENS)
    assert np.array_equal(got, logits(tmp_path / "whole.gguf", TOKENS))
    assert not np.array_equal(got, logits(first, TOKENS))


@pytest.fixture(scope="module")
def tiny_llama(smollm2: Path) -> Path:
    from llama_cpp_tools import tiny_llama

    return tiny_llama(smollm2)
