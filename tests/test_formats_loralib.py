"""loralib (microsoft/LoRA) checkpoints: the paper authors' released file, MergedLinear, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_base
from hypothesis import given, settings
from llama_adapters import assert_same_delta, llama_adapters, module

from loractl.adapter import Adapter
from loractl.errors import PickleRefusedError, UsageError
from loractl.formats import describe_adapter, detect_format, load_adapter, save_adapter
from loractl.formats.options import ReadOptions, WriteOptions

PICKLE = ReadOptions(allow_pickle=True)


@pytest.fixture
def roberta(real_adapters: Path) -> Path:
    path = real_adapters / "loralib-roberta-base-mnli" / "roberta_base_lora_mnli.bin"
    if not path.is_file():
        pytest.skip("the loralib RoBERTa file is absent")
    return path


def test_real_roberta_mnli_checkpoint(roberta: Path, tmp_path: Path) -> None:
    """52 tensors: 24 modules (query/value × 12 layers), alpha 16 / r 8 → scale 2, classifier as full tensors."""
    raw = torch.load(roberta, map_location="cpu", weights_only=True)
    assert len(raw) == 52 and detect_format(roberta) == "loralib"
    with pytest.raises(PickleRefusedError):
        load_adapter(roberta, options=ReadOptions(alpha=16))
    with pytest.raises(UsageError, match="--alpha"):
        load_adapter(roberta, options=PICKLE)
    adapter = load_adapter(roberta, options=ReadOptions(allow_pickle=True, alpha=16))
    assert len(adapter.modules) == 24
    assert set(adapter.full_tensors) == {
        f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")
    }
    for name, m in adapter.modules.items():
        assert m.rank == 8 and m.scale == 2.0
        assert torch.equal(m.delta_weight(), (raw[name + ".lora_B"] @ raw[name + ".lora_A"]) * 2.0)
    via_peft = load_adapter(save_adapter(adapter, tmp_path / "peft", format="peft"))
    back = load_adapter(save_adapter(via_peft, tmp_path / "lora.bin", format="loralib"), options=PICKLE)
    for other in (via_peft, back):  # same factors and scales: ΔW unchanged to the bit
        assert _factors(other) == _factors(adapter)
        assert all(torch.equal(other.full_tensors[k], t) for k, t in adapter.full_tensors.items())


def _factors(adapter: Adapter) -> dict[str, tuple[float, bytes, bytes]]:
    return {n: (m.scale, m.A.numpy().tobytes(), m.B.numpy().tobytes()) for n, m in adapter.modules.items()}


@settings(max_examples=12)
@given(adapter=llama_adapters(embedding=True))
def test_round_trip_keeps_every_delta(adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = save_adapter(adapter, tmp_path_factory.mktemp("l") / "lora.pt", format="loralib")
    stored = torch.load(out, weights_only=True)
    assert set(stored) == {"model_state_dict", "lora_alpha", "lora_r"}
    assert all(k.endswith((".lora_A", ".lora_B")) for k in stored["model_state_dict"])
    assert_same_delta(adapter, load_adapter(out, options=PICKLE))


def test_alpha_option_is_the_stored_alpha(tmp_path: Path) -> None:
    adapter = Adapter(
        modules={"enc.q": module(8, 8, 2, 5.0, False, seed=1), "enc.v": module(8, 8, 4, 16.0, True, seed=2)}
    )
    out = save_adapter(adapter, tmp_path / "l.bin", format="loralib", options=WriteOptions(alpha=32.0))
    stored = torch.load(out, weights_only=True)
    assert (stored["lora_alpha"], stored["lora_r"]) == (32.0, 4)
    assert_same_delta(adapter, load_adapter(out, options=PICKLE))


def _loralib_merged_delta(a: torch.Tensor, b: torch.Tensor, enable: list[bool], out: int) -> torch.Tensor:
    """loralib.MergedLinear.merge_AB + zero_pad, as in microsoft/LoRA layers.py (fan_in_fan_out=True)."""
    delta = F.conv1d(a.unsqueeze(0), b.unsqueeze(-1), groups=sum(enable)).squeeze(0)
    ind = torch.zeros(out, dtype=torch.bool).view(len(enable), -1)
    ind[enable, :] = True
    full = delta.new_zeros(out, a.shape[1])
    full[ind.view(-1)] = delta
    return full.T


@pytest.mark.parametrize("enable", [[True, False, True], [True, True, True]])
def test_merged_linear_reads_as_block_diagonal_lora(tmp_path: Path, enable: list[bool]) -> None:
    hidden, r, k = 16, 2, sum(enable)
    base = tiny_base(tmp_path / "gpt2", {"h.0.attn.c_attn.weight": (hidden, 3 * hidden)})  # Conv1D: (in, out)
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r * k, hidden, generator=g), torch.randn(hidden * k, r, generator=g)
    path = tmp_path / "lora.pt"
    torch.save({"model_state_dict": {"h.0.attn.c_attn.lora_A": a, "h.0.attn.c_attn.lora_B": b}}, path)
    with pytest.raises(UsageError, match="--base"):
        load_adapter(path, options=ReadOptions(allow_pickle=True, alpha=4))
    options = ReadOptions(allow_pickle=True, alpha=4, base=base)
    m = load_adapter(path, options=options).modules["h.0.attn.c_attn"]
    assert m.fan_in_fan_out and m.rank == r * k and m.scale == 4 / r
    expected = _loralib_merged_delta(a, b, enable, 3 * hidden) * (4 / r)
    assert torch.allclose(m.delta_weight(), expected, rtol=1e-6, atol=1e-6)
    findings = describe_adapter(path, options=options).findings
    assert any(f.code == "merged-assumed" for f in findings) == (k == 2)
