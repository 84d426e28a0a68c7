"""torchtune native checkpoints: round trips, Meta q/k row order against torchtune's formula, pickles."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from llama_adapters import HEADS, KV_HEADS, assert_same_delta, llama_adapters, module, torchtune_permute_lora

from loractl.adapter import Adapter
from loractl.errors import AdapterError, PickleRefusedError, UsageError
from loractl.formats import detect_format, load_adapter, save_adapter
from loractl.formats.options import ReadOptions, WriteOptions

BASE = Path(__file__).parent.parent / "fixtures" / "tiny-llama"
READ = ReadOptions(allow_pickle=True, base=BASE)


def _write(adapter: Adapter, path: Path, alpha: float | None = None) -> Path:
    return save_adapter(adapter, path, format="torchtune", options=WriteOptions(base=BASE, alpha=alpha))


@settings(max_examples=12)
@given(adapter=llama_adapters(lm_head=True))
def test_round_trip_keeps_every_delta(adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = _write(adapter, tmp_path_factory.mktemp("t") / "epoch_0")
    assert detect_format(out) == "torchtune"
    back = load_adapter(out, options=READ)
    assert_same_delta(adapter, back)
    assert len({m.rank for m in back.modules.values()}) == 1  # one rank: smaller ones zero-padded


def test_reads_a_native_checkpoint_like_torchtune_writes(tmp_path: Path) -> None:
    """q/k lora_b rows in Meta order become HF order by torchtune's own `_permute_lora_matrix`."""
    g = torch.Generator().manual_seed(0)
    state = {
        "layers.0.attn.q_proj.lora_a.weight": torch.randn(8, 64, generator=g),
        "layers.0.attn.q_proj.lora_b.weight": torch.randn(64, 8, generator=g),
        "layers.1.attn.k_proj.lora_a.weight": torch.randn(8, 64, generator=g),
        "layers.1.attn.k_proj.lora_b.weight": torch.randn(32, 8, generator=g),
        "layers.1.mlp.w2.lora_a.weight": torch.randn(8, 128, generator=g),
        "layers.1.mlp.w2.lora_b.weight": torch.randn(64, 8, generator=g),
        "output.lora_a.weight": torch.randn(8, 64, generator=g),
        "output.lora_b.weight": torch.randn(256, 8, generator=g),
    }
    (tmp_path / "epoch_0").mkdir()
    torch.save(state, tmp_path / "epoch_0" / "adapter_model.pt")
    path = tmp_path / "epoch_0" / "adapter_model.pt"
    assert detect_format(path) == "torchtune"
    with pytest.raises(PickleRefusedError):
        load_adapter(path, options=ReadOptions(base=BASE, alpha=16))
    with pytest.raises(UsageError, match="lora_alpha"):
        load_adapter(path, options=ReadOptions(allow_pickle=True, base=BASE))
    with pytest.raises(UsageError, match="head counts"):
        load_adapter(path, options=ReadOptions(allow_pickle=True, alpha=16))
    back = load_adapter(path, options=replace(READ, alpha=16))
    q, k = back.modules["model.layers.0.self_attn.q_proj"], back.modules["model.layers.1.self_attn.k_proj"]
    assert torch.equal(q.B, torchtune_permute_lora(state["layers.0.attn.q_proj.lora_b.weight"], HEADS))
    assert torch.equal(k.B, torchtune_permute_lora(state["layers.1.attn.k_proj.lora_b.weight"], KV_HEADS))
    assert torch.equal(back.modules["model.layers.1.mlp.down_proj"].B, state["layers.1.mlp.w2.lora_b.weight"])
    assert set(back.modules) >= {"lm_head"} and q.scale == 2.0
    (tmp_path / "epoch_0" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 4}))
    assert load_adapter(tmp_path / "epoch_0", options=READ).modules["lm_head"].scale == 0.5


def test_writer_output_and_dora_magnitude_rows(tmp_path: Path) -> None:
    q = module(64, 64, 4, 8.0, False, seed=1)
    adapter = Adapter(
        modules={
            "model.layers.0.self_attn.q_proj": replace(q, magnitude=torch.arange(64.0)),
            "model.layers.0.self_attn.v_proj": module(32, 64, 2, 8.0, False, seed=2, magnitude=torch.ones(32)),
        }
    )
    out = _write(adapter, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text()) == {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
        "base_model_name_or_path": None,
    }  # fmt: skip
    state = torch.load(out / "adapter_model.pt", weights_only=True)
    assert torchtune_permute_lora(state["layers.0.attn.q_proj.lora_b.weight"], HEADS).equal(q.B)
    assert torchtune_permute_lora(state["layers.0.attn.q_proj.magnitude"][:, None], HEADS)[:, 0].equal(
        torch.arange(64.0)
    )
    back = load_adapter(out, options=READ)
    assert_same_delta(adapter, back)
    assert torch.equal(back.modules["model.layers.0.self_attn.q_proj"].magnitude, torch.arange(64.0))


def test_torchtune_and_gguf_share_the_meta_row_order(tmp_path: Path) -> None:
    """FORMATS.md §5.3 (verified there): torchtune-native and GGUF q/k lora_b rows are identical."""
    gguf = pytest.importorskip("gguf")
    adapter = Adapter(modules={"model.layers.1.self_attn.k_proj": module(32, 64, 4, 8.0, False, seed=3)})
    tt = torch.load(_write(adapter, tmp_path / "tt") / "adapter_model.pt", weights_only=True)
    g = save_adapter(adapter, tmp_path / "a.gguf", format="gguf", options=WriteOptions(base=BASE))
    rows = {t.name: t.data for t in gguf.GGUFReader(g).tensors}["blk.1.attn_k.weight.lora_b"]
    assert torch.equal(torch.from_numpy(rows.copy()), tt["layers.1.attn.k_proj.lora_b.weight"])


def test_peft_export_beside_native_file_is_read_as_peft(fixtures_dir: Path, tmp_path: Path) -> None:
    out = _write(load_adapter(fixtures_dir / "adapters" / "tiny-qv"), tmp_path / "epoch_0")
    (out / "adapter_model.safetensors").write_bytes(
        (fixtures_dir / "adapters" / "tiny-qv" / "adapter_model.safetensors").read_bytes()
    )
    assert detect_format(out) == "peft"
    assert detect_format(out / "adapter_model.pt") == "torchtune"


def test_modules_torchtune_cannot_name_are_refused(tmp_path: Path) -> None:
    odd = Adapter(modules={"encoder.block.0.query": module(64, 64, 4, 8.0, False, seed=1)})
    with pytest.raises(AdapterError, match="no torchtune name"):
        _write(odd, tmp_path / "x")
    assert not (tmp_path / "x").exists()
