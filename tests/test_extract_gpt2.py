"""extract on a GPT-2 base: Conv1D weights are (in, out), so the adapter must say fan_in_fan_out."""

from __future__ import annotations

from pathlib import Path

import torch

import loractl


def test_gpt2_extract_loads_in_peft_and_reproduces_the_finetune(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = GPT2LMHeadModel(config).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for block in tuned.transformer.h:
            w = block.attn.c_attn.weight  # Conv1D: (in, out) = (32, 96)
            w += 0.05 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1])  # a rank-2 change
    tuned.save_pretrained(tmp_path / "tuned")

    report = loractl.extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", loractl.ExtractConfig(rank=2))
    modules = loractl.load_adapter(tmp_path / "lora").modules
    assert set(modules) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    assert all(m.fan_in_fan_out and m.A.shape == (2, 32) and m.B.shape == (96, 2) for m in modules.values())
    assert max(r.rel_error for r in report.modules) < 1e-5

    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
