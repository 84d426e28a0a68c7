"""DoRA training (`--dora`): the layer against PEFT's DoRA, the same steps as PEFT's, a PEFT-loadable adapter."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from peft_twins import FIXTURES, TINY, config, ours_vs_peft
from test_train_layers import mlp
from torch import nn

from loractl.train import TrainConfig, inject, train_adapter
from loractl.train.base import load_base

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def dora_twins(conv1d: bool, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """loractl's and PEFT's DoRA on the same MLP, holding the same non-zero B and a moved magnitude."""
    model = mlp(conv1d)
    lora = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["fc1", "fc2"], init_lora_weights=False,
                           fan_in_fan_out=conv1d, use_dora=True, lora_dropout=dropout)  # fmt: skip
    torch.manual_seed(1)
    twin = peft.get_peft_model(copy.deepcopy(model), lora)
    inject(model, TrainConfig(rank=4, alpha=6.0, targets=("fc1", "fc2"), dora=True, dropout=dropout))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            theirs, ours = twin.base_model.model.get_submodule(name), model.get_submodule(name)
            magnitude = theirs.lora_magnitude_vector["default"].weight
            magnitude.mul_(torch.linspace(0.5, 1.5, magnitude.numel()))  # not the norm: g ≠ 1
            ours.lora_A.copy_(theirs.lora_A["default"].weight)
            ours.lora_B.copy_(theirs.lora_B["default"].weight)
            ours.magnitude.copy_(magnitude)
    return model, twin


def assert_same_step(model: nn.Module, twin: nn.Module, *, seed: int | None = None) -> None:
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = (torch.manual_seed(seed), model(x_ours))[1] if seed is not None else model(x_ours)
    theirs = (torch.manual_seed(seed), twin(x_theirs))[1] if seed is not None else twin(x_theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (ours**2).sum().backward()
    (theirs**2).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    for name in ("fc1", "fc2"):
        mine, peer = model.get_submodule(name), twin.base_model.model.get_submodule(name)
        pairs = [(mine.lora_A, peer.lora_A["default"].weight), (mine.lora_B, peer.lora_B["default"].weight),
                 (mine.magnitude, peer.lora_magnitude_vector["default"].weight)]  # fmt: skip
        for a, b in pairs:
            assert a.grad is not None and a.grad.abs().sum() > 0
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_layer_matches_peft_forward_and_gradients(conv1d: bool) -> None:
    model, twin = dora_twins(conv1d)
    assert_same_step(model, twin)


@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_with_dropout_matches_peft_on_the_same_mask(conv1d: bool) -> None:
    model, twin = dora_twins(conv1d, dropout=0.3)
    model.train()
    twin.train()
    assert_same_step(model, twin, seed=5)  # each draws one mask, in the same order


def test_dora_starts_at_the_base_with_the_weight_norms() -> None:
    model = mlp()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    before = model(x)
    inject(model, TrainConfig(targets=("fc1", "fc2"), dora=True))
    torch.testing.assert_close(model.fc1.magnitude, model.fc1.base_layer.weight.norm(dim=1))
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"fc1.magnitude", "fc2.magnitude"}


def test_dora_takes_the_steps_peft_takes() -> None:
    ours, theirs = ours_vs_peft(config(dora=True))
    assert ours[-1] < 0.9 * ours[0]
    torch.testing.assert_close(
        torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0
    )  # plain LoRA: 1.1e-4 (AdamW)


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs the qlora extra")


@needs_bnb
def test_dora_on_an_nf4_base_takes_peft_s_steps() -> None:
    ours, theirs = ours_vs_peft(config(dora=True, quantize="nf4"), quantize="nf4")
    assert ours[-1] < 0.9 * ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


@needs_bnb
def test_dora_on_an_int8_base_is_dora_on_its_dequantized_weights() -> None:
    """PEFT 0.21's int8 DoRA fails on the CPU (its norm pass leaves bitsandbytes' state without SCB): the
    reference is DoRA on a float32 base holding CB · SCB / 127, the weights bitsandbytes computes with."""
    from peft_twins import Losses, examples

    from loractl.train import train
    from loractl.train.base_matmul import frozen_weight

    quantized, tokenizer = load_base(TINY, quantize="int8")
    dense, _ = load_base(TINY)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if type(layer).__name__ == "Linear8bitLt":
                dense.get_submodule(name).weight.copy_(frozen_weight(layer, torch.float32))
    losses = []
    for model in (quantized, dense):
        inject(model, config(dora=True))
        record = Losses()
        train(model, examples(tokenizer), config(dora=True), callbacks=[record])
        losses.append(record.losses)
    assert losses[0][-1] < 0.9 * losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)


def test_dora_adapter_loads_in_peft_with_the_eval_loss_loractl_reported(tmp_path: Path) -> None:
    from loractl.train.data import collate, load_dataset

    cfg = TrainConfig(targets="all-linear", rank=4, alpha=8, lr=1e-2, steps=3, batch_size=4, dora=True)
    data = FIXTURES / "data"
    summary = train_adapter(TINY, data / "train.jsonl", tmp_path / "out", cfg, eval_data=data / "eval.jsonl")
    model, tokenizer = load_base(TINY)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "out").eval()
    assert peft_model.peft_config["default"].use_dora
    rows = load_dataset(data / "eval.jsonl", tokenizer, cfg.max_len).examples
    batch = collate(rows, tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert summary.result.eval_loss is not None
    assert abs(float(loss) - summary.result.eval_loss) < 1e-5 * summary.result.eval_loss
    with torch.no_grad():
        base_logits = load_base(TINY)[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base_loss = nn.functional.cross_entropy(base_logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(float(base_loss) - float(loss)) > 1e-3  # the adapter does something PEFT reproduces
    assert_merge_is_peft_s(tmp_path / "out", peft_model, tmp_path / "merged")
    from loractl.validation import validate_adapter

    assert validate_adapter(tmp_path / "out", base=TINY).findings == []


def assert_merge_is_peft_s(adapter: Path, peft_model: nn.Module, output: Path) -> None:
    """`loractl merge` of the trained adapter gives the weights of PEFT's `merge_and_unload`."""
    from loractl.io.checkpoint import Checkpoint
    from loractl.ops.merge import merge

    merge(TINY, [adapter], output)
    want = dict(peft_model.merge_and_unload().named_parameters())
    with Checkpoint(output) as merged:
        assert set(merged.names) >= set(want)
        changed = 0
        for name, ref in want.items():
            torch.testing.assert_close(merged.get(name), ref.detach(), rtol=1e-5, atol=1e-6)
            changed += "proj" in name
        assert changed == 7 * 2  # every adapted linear of both layers
