"""PiSSA / OLoRA (`--init`) and LoRA+ (`--lora-plus-ratio`) against PEFT: the init, the steps, the saved adapter."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_twins import FIXTURES, TARGETS, TINY, config, examples, ours_vs_peft
from safetensors.torch import load_file
from test_train_layers import mlp
from torch import nn

from loractl.errors import UsageError
from loractl.formats import save_adapter
from loractl.train import TrainConfig, inject, train_adapter
from loractl.train.base import load_base
from loractl.train.export import adapter_from_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def peft_init_twin(model: nn.Module, init: str, conv1d: bool, rslora: bool = False) -> nn.Module:
    lora = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["fc1", "fc2"], init_lora_weights=init,
                           fan_in_fan_out=conv1d, use_rslora=rslora)  # fmt: skip
    torch.manual_seed(0)  # PEFT draws nn.Linear's init for A and B before pissa_niter's svd_lowrank
    return peft.get_peft_model(copy.deepcopy(model), lora)


@pytest.mark.parametrize(("init", "conv1d"), [("pissa", False), ("pissa", True), ("olora", False)])
def test_the_init_is_peft_s_and_the_model_starts_at_the_base(init: str, conv1d: bool) -> None:
    model = mlp(conv1d)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    before = model(x)
    twin = peft_init_twin(model, init, conv1d)
    inject(model, TrainConfig(rank=4, alpha=6, targets=("fc1", "fc2"), init=init))
    for name in ("fc1", "fc2"):
        ours, theirs = model.get_submodule(name), twin.base_model.model.get_submodule(name)
        torch.testing.assert_close(ours.lora_A, theirs.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.lora_B, theirs.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert ours.lora_B.abs().sum() > 0  # not a zero start: the base moved into the factors
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_olora_on_conv1d_factors_the_out_in_weight() -> None:
    """PEFT's olora_init ignores fan_in_fan_out (it factors the (in, out) Conv1D weight); loractl factors (out, in)."""
    model = mlp(conv1d=True)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    before = model(x)
    inject(model, TrainConfig(rank=4, alpha=6, targets=("fc1", "fc2"), init="olora"))
    assert model.fc1.lora_A.shape == (4, 12) and model.fc1.lora_B.shape == (20, 4)
    torch.testing.assert_close(model.fc1.lora_B.t() @ model.fc1.lora_B, torch.eye(4), atol=1e-5, rtol=0)  # Q's columns
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_pissa_niter_draws_what_peft_draws_and_is_seeded() -> None:
    model = mlp()
    cfg = TrainConfig(rank=4, alpha=6, targets=("fc1", "fc2"), init="pissa_niter_2", seed=3)
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["fc1"]))
    layer = twin.base_model.model.fc1
    layer.update_layer("fast", 4, 6, peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False))
    torch.manual_seed(3)
    layer.pissa_init("fast", "pissa_niter_2")  # PEFT's draw alone, from the seed inject uses
    again = copy.deepcopy(model)
    inject(model, cfg)
    inject(again, cfg)
    torch.testing.assert_close(model.fc1.lora_A, layer.lora_A["fast"].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.fc1.lora_B, layer.lora_B["fast"].weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.fc2.lora_A, again.fc2.lora_A)  # the same seed, the same start


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_take_the_steps_peft_takes(init: str) -> None:
    ours, theirs = ours_vs_peft(config(init=init), lora={"init_lora_weights": init})
    assert ours[-1] < 0.9 * ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


def test_the_saved_adapter_is_peft_s_conversion_and_holds_on_the_original_base(tmp_path: Path) -> None:
    """The rank-2r LoRA PEFT writes with path_initial_model_for_weight_conversion, tensor for tensor; on the
    unmodified base PEFT computes the eval loss loractl reported (the PiSSA model's own)."""
    from loractl.train.data import collate, load_dataset

    cfg = TrainConfig(targets=tuple(TARGETS), rank=4, alpha=8, lr=1e-2, steps=3, batch_size=6, init="pissa",
                      schedule="constant", max_grad_norm=None, rslora=True)  # fmt: skip
    data = FIXTURES / "data"
    theirs, twin = _peft_pissa_run(cfg, tmp_path)
    model, _ = load_base(TINY)
    inject(model, cfg)  # PiSSA's start computed here; the trained factors PEFT's (the steps are tested above)
    with torch.no_grad():
        for name in (n for n, m in model.named_modules() if hasattr(m, "lora_A0")):
            peer = twin.base_model.model.get_submodule(name)
            model.get_submodule(name).lora_A.copy_(peer.lora_A["default"].weight)
            model.get_submodule(name).lora_B.copy_(peer.lora_B["default"].weight)
    save_adapter(adapter_from_model(model), tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(ours) == set(theirs) and all(t.shape[0] == 8 or t.shape[1] == 8 for t in ours.values())
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6)
    summary = train_adapter(TINY, data / "train.jsonl", tmp_path / "out", cfg, eval_data=data / "eval.jsonl")
    model, tokenizer = load_base(TINY)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "out").eval()
    assert peft_model.peft_config["default"].r == 8 and peft_model.peft_config["default"].lora_alpha == 8 * 2**0.5
    batch = collate(load_dataset(data / "eval.jsonl", tokenizer, cfg.max_len).examples, 0)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert summary.result.eval_loss is not None
    assert abs(float(loss) - summary.result.eval_loss) < 1e-5 * summary.result.eval_loss
    from loractl.validation import validate_adapter

    assert validate_adapter(tmp_path / "out", base=TINY).findings == []  # fingerprinted from the files


def _peft_pissa_run(cfg: TrainConfig, tmp_path: Path) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """PEFT's PiSSA trained the same steps, saved converted (`path_initial_model_for_weight_conversion`)."""
    model, tokenizer = load_base(TINY)
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=TARGETS, init_lora_weights="pissa",
                           use_rslora=cfg.rslora)  # fmt: skip
    twin = peft.get_peft_model(model, lora)
    twin.save_pretrained(tmp_path / "peft-init")
    from loractl.train.data import collate

    rows = examples(tokenizer)
    batch = collate(rows[: cfg.batch_size], 0)
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=cfg.lr)
    for _ in range(cfg.steps or 0):
        loss = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    twin.save_pretrained(tmp_path / "peft-out", path_initial_model_for_weight_conversion=tmp_path / "peft-init")
    return load_file(tmp_path / "peft-out" / "adapter_model.safetensors"), twin


def loraplus(ratio: float, lr: float, embedding_lr: float = 1e-6) -> Any:
    from peft.optimizers import create_loraplus_optimizer

    return lambda twin: create_loraplus_optimizer(twin, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                                  loraplus_lr_embedding=embedding_lr)  # fmt: skip


def test_lora_plus_takes_peft_s_steps() -> None:
    plain, _ = ours_vs_peft(config(steps=3))
    ours, theirs = ours_vs_peft(config(lora_plus_ratio=8.0, lr=5e-3), optimizer_of=loraplus(8.0, 5e-3))
    assert ours[-1] < 0.9 * ours[0] and ours != plain
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


def test_lora_plus_puts_dora_s_magnitude_with_b_as_peft_does() -> None:
    ours, theirs = ours_vs_peft(config(lora_plus_ratio=4.0, dora=True), optimizer_of=loraplus(4.0, 2e-2))
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


def test_lora_plus_gives_the_embedding_lora_its_own_rate_as_peft_does() -> None:
    targets = [*TARGETS, "embed_tokens"]
    cfg = config(lora_plus_ratio=4.0, lora_plus_embedding_lr=1e-2, targets=tuple(targets))
    ours, theirs = ours_vs_peft(cfg, lora={"target_modules": targets}, optimizer_of=loraplus(4.0, 2e-2, 1e-2))
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"init": "pissa", "dora": True}, "magnitude"),
        ({"init": "olora", "quantize": "nf4"}, "re-quantized"),
        ({"init": "pissa_niter_0"}, "pissa_niter_N"),
        ({"init": "svd"}, "pissa_niter_N"),
        ({"lora_plus_ratio": 0.0}, "positive"),
    ],
)
def test_combinations_that_cannot_hold_are_refused(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        TrainConfig(**settings).check()


def test_rank_past_the_weight_is_refused() -> None:
    with pytest.raises(UsageError, match="exceeds"):
        inject(mlp(), TrainConfig(rank=9, targets=("fc2",), init="pissa"))


def test_cli_options_reach_the_run_and_bad_values_are_one_error_line(tmp_path: Path) -> None:
    import json

    from tests.helpers import run_cli

    common = ["train", "--base", TINY, "--data", FIXTURES / "data" / "train.jsonl", "--steps", "1", "--batch-size", "2"]
    code, out, err = run_cli(*common, "-o", tmp_path / "a", "--rank", "4", "--init", "olora",
                             "--lora-plus-ratio", "16", "--json")  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (8, 32)  # 2r and 2α: a plain LoRA of the same scale
    assert json.loads(out)["steps"] == 1
    code, out, err = run_cli(*common, "-o", tmp_path / "b", "--init", "svd")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 2 and lines[0].startswith("error: init 'svd' is not one of")
    assert lines[1].startswith("hint: ") and "pissa_niter_4" in lines[1]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_bf16_base_keeps_a_bf16_residual_as_peft_s(init: str) -> None:
    """PEFT's rule for a bf16 base: SVD/QR in float32, the residual stored in bf16 (the start is off by its rounding)."""
    model = mlp().to(torch.bfloat16)
    twin = peft_init_twin(model, init, conv1d=False)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    before = model(x).float()
    inject(model, TrainConfig(rank=4, alpha=6, targets=("fc1", "fc2"), init=init))
    for name in ("fc1", "fc2"):
        ours, theirs = model.get_submodule(name), twin.base_model.model.get_submodule(name)
        assert ours.base_layer.weight.dtype == torch.bfloat16 and ours.lora_A.dtype == torch.float32
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=0, atol=0)
        torch.testing.assert_close(ours.lora_B @ ours.lora_A, theirs.lora_B["default"].weight.float()
                                   @ theirs.lora_A["default"].weight.float(), rtol=1e-2, atol=1e-2)  # fmt: skip
    torch.testing.assert_close(model(x).float(), before, rtol=0.05, atol=0.05)
