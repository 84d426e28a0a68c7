"""GGUF adapters: round trips, and the file read back with gguf-py the way llama.cpp reads it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from llama_adapters import (
    HEADS,
    KV_HEADS,
    assert_same_delta,
    llama_adapters,
    llama_cpp_permute,
    module,
)

from loractl.adapter import Adapter
from loractl.errors import AdapterError, FormatError, UsageError
from loractl.formats import describe_adapter, detect_format, load_adapter, peft, save_adapter
from loractl.formats.options import ReadOptions, WriteOptions

gguf = pytest.importorskip("gguf")


@pytest.fixture
def base(fixtures_dir: Path) -> Path:
    return fixtures_dir / "tiny-llama"


def _write(adapter: Adapter, path: Path, base: Path | None, alpha: float | None = None) -> Path:
    return save_adapter(adapter, path, format="gguf", options=WriteOptions(base=base, alpha=alpha))


@settings(max_examples=12)
@given(adapter=llama_adapters(embedding=True, lm_head=True))
def test_round_trip_keeps_every_delta(adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = Path(__file__).parent.parent / "fixtures" / "tiny-llama"
    out = _write(adapter, tmp_path_factory.mktemp("g") / "a.gguf", base)
    assert detect_format(out) == "gguf"
    assert_same_delta(adapter, load_adapter(out, options=ReadOptions(base=base)))
    assert_same_delta(adapter, load_adapter(out))  # names and head counts recorded in the file


def test_matches_what_llama_cpp_converter_writes(base: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    """FORMATS.md §5: names, ne order, F32, alpha = lora_alpha, q/k lora_b permuted, lora_a as is."""
    source = fixtures_dir / "adapters" / "tiny-qv"
    config = json.loads((source / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    peft_tensors = load_file(source / "adapter_model.safetensors")
    out = _write(peft.read(source), tmp_path / "a.gguf", base)

    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == config["lora_alpha"]
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    tensors = {t.name: t for t in reader.tensors}
    expected = set()
    for layer in range(2):
        for proj, short, heads in (("q_proj", "attn_q", HEADS), ("v_proj", "attn_v", None)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a, b = peft_tensors[key + ".lora_A.weight"], peft_tensors[key + ".lora_B.weight"]
            ta, tb = tensors[f"blk.{layer}.{short}.weight.lora_a"], tensors[f"blk.{layer}.{short}.weight.lora_b"]
            expected |= {ta.name, tb.name}
            assert list(ta.shape) == [a.shape[1], a.shape[0]]  # ne = reversed numpy shape
            assert list(tb.shape) == [b.shape[1], b.shape[0]]
            assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(ta.data, a.numpy())
            want_b = llama_cpp_permute(b, HEADS, HEADS) if heads else b
            assert np.array_equal(tb.data, want_b.numpy())
    assert set(tensors) == expected
    assert not torch.equal(llama_cpp_permute(b, HEADS, HEADS), b)  # the permutation is not the identity here


def test_k_proj_uses_kv_heads_and_embedding_a_is_transposed(base: Path, tmp_path: Path) -> None:
    adapter = Adapter(
        modules={
            "model.layers.1.self_attn.k_proj": module(32, 64, 4, 8.0, False, seed=1),
            "model.embed_tokens": module(64, 256, 4, 8.0, False, seed=2, kind="embedding"),
        }
    )
    out = _write(adapter, tmp_path / "a.gguf", base)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    k = adapter.modules["model.layers.1.self_attn.k_proj"]
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"].data, llama_cpp_permute(k.B, HEADS, KV_HEADS).numpy())
    emb = adapter.modules["model.embed_tokens"]
    assert list(tensors["token_embd.weight.lora_a"].data.shape) == [256, 4]  # (vocab, r) = Aᵀ
    assert np.array_equal(tensors["token_embd.weight.lora_a"].data, emb.A.T.numpy())
    assert_same_delta(adapter, load_adapter(out))


def test_one_alpha_folds_other_scales_into_b(base: Path, tmp_path: Path) -> None:
    adapter = Adapter(
        modules={
            "model.layers.0.self_attn.v_proj": module(32, 64, 4, 16.0, False, seed=1),
            "model.layers.1.self_attn.v_proj": module(32, 64, 4, 16.0, False, seed=2),
            "model.layers.0.mlp.down_proj": module(64, 128, 2, 3.0, True, seed=3),  # rsLoRA, another alpha
        }
    )
    out = _write(adapter, tmp_path / "a.gguf", base)
    reader = gguf.GGUFReader(out)
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0  # the most common scale·r
    back = load_adapter(out)
    assert_same_delta(adapter, back)
    assert torch.equal(
        back.modules["model.layers.0.self_attn.v_proj"].B, adapter.modules["model.layers.0.self_attn.v_proj"].B
    )
    assert back.modules["model.layers.0.mlp.down_proj"].scale == 16.0 / 2
    assert_same_delta(adapter, load_adapter(_write(adapter, tmp_path / "b.gguf", base, alpha=1.0)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_kept_bit_for_bit(base: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    m = module(64, 64, 4, 8.0, False, seed=5)
    adapter = Adapter(modules={"model.layers.0.self_attn.o_proj": replace(m, A=m.A.to(dtype), B=m.B.to(dtype))})
    back = load_adapter(_write(adapter, tmp_path / "a.gguf", base)).modules["model.layers.0.self_attn.o_proj"]
    assert back.A.dtype == dtype and torch.equal(back.A, adapter.modules["model.layers.0.self_attn.o_proj"].A)
    assert torch.equal(back.B, adapter.modules["model.layers.0.self_attn.o_proj"].B)


def test_foreign_file_needs_base_for_qk_rows(base: Path, tmp_path: Path) -> None:
    """A file as llama.cpp writes it (no loractl keys): names come from gguf-py's map, heads from --base."""
    q = module(64, 64, 4, 16.0, False, seed=7)
    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", q.A.numpy())
    w.add_tensor("blk.0.attn_q.weight.lora_b", llama_cpp_permute(q.B, HEADS, HEADS).numpy())
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UsageError, match="head counts"):
        load_adapter(path)
    back = load_adapter(path, options=ReadOptions(base=base))
    assert_same_delta(Adapter(modules={"model.layers.0.self_attn.q_proj": q}), back)
    assert torch.equal(back.full_tensors["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert any("guessed" in f.message for f in describe_adapter(path).findings)


def test_model_file_and_legacy_file_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="not an adapter"):
        load_adapter(model)
    legacy = tmp_path / "ggml-adapter-model.bin"
    legacy.write_bytes((0x67676C61).to_bytes(4, "little") + b"\0" * 16)
    assert detect_format(legacy) == "gguf"
    with pytest.raises(FormatError, match="legacy") as e:
        load_adapter(legacy)
    assert "again" in (e.value.hint or "")


def test_what_gguf_cannot_hold_is_left_out(base: Path, tmp_path: Path) -> None:
    m = module(64, 64, 4, 8.0, False, seed=1)
    dora = replace(m, magnitude=torch.ones(64), bias=torch.zeros(64))
    adapter = Adapter(
        modules={"model.layers.0.self_attn.o_proj": dora},
        full_tensors={"model.norm.weight": torch.ones(64), "score.weight": torch.ones(3, 64)},
    )
    back = load_adapter(_write(adapter, tmp_path / "a.gguf", base))
    o = back.modules["model.layers.0.self_attn.o_proj"]
    assert o.magnitude is None and o.bias is None
    assert set(back.full_tensors) == {"model.norm.weight"}
    assert back.meta.recorded_hash == back.content_hash()


def test_write_errors(base: Path, tmp_path: Path) -> None:
    q = Adapter(modules={"model.layers.0.self_attn.q_proj": module(64, 64, 4, 8.0, False, seed=1)})
    with pytest.raises(UsageError, match="architecture"):
        _write(q, tmp_path / "a.gguf", None)
    odd = Adapter(modules={"model.layers.0.not_a_layer": module(64, 64, 4, 8.0, False, seed=1)})
    with pytest.raises(AdapterError, match="no GGUF name"):
        _write(odd, tmp_path / "b.gguf", base)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("heads", [[0, 0], [3, 1], [64, 64], [4, 8], [-4, 4], [2**20, 1], ["4", "4"]])
def test_recorded_head_counts_that_cannot_be_right_need_base(
    heads: list[object], base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27 item 9: `loractl.rope_heads` is a hint, not a proof; [0, 0] skipped the q/k un-permutation."""
    from cli_runner import run

    q = module(64, 64, 4, 16.0, False, seed=7)
    path = tmp_path / "lying.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    w.add_array("loractl.rope_heads", heads)
    w.add_tensor("blk.0.attn_q.weight.lora_a", q.A.numpy())
    w.add_tensor("blk.0.attn_q.weight.lora_b", llama_cpp_permute(q.B, HEADS, HEADS).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UsageError, match="cannot be this adapter's head counts") as refused:
        load_adapter(path)
    assert "--base" in (refused.value.hint or "")
    code, _, err = run(capsys, "convert", str(path), "--to", "peft", "-o", str(tmp_path / "out"))
    assert code == 2 and "--base" in err and not (tmp_path / "out").exists()
    assert_same_delta(
        Adapter(modules={"model.layers.0.self_attn.q_proj": q}), load_adapter(path, options=ReadOptions(base=base))
    )
