"""Lower-precision bases: a bf16 base and bitsandbytes-quantized bases (QLoRA), each against PEFT on the same base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from oracles import oracle
from torch import nn

from loractl.train import Callback, TrainConfig, inject, train, train_adapter
from loractl.train.base import load_base
from loractl.train.data import Example, collate, load_dataset

peft = pytest.importorskip("peft")
oracle("bitsandbytes", "bitsandbytes", "qlora")

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        self.losses.append(metrics["loss"])
        return None


def examples(tokenizer: Any) -> list[Example]:
    return list(load_dataset(FIXTURES / "data" / "train.jsonl", tokenizer, 32).examples[:6])


def peft_losses(model: nn.Module, ours: nn.Module, rows: list[Example], config: TrainConfig) -> list[float]:
    """PEFT's LoRA on `model`, started from our A (B = 0), trained by the plain loop a PEFT user writes."""
    lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=TARGETS, lora_dropout=0.0)
    twin = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if hasattr(module, "lora_A"):
                theirs = twin.base_model.model.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(module.lora_A)
    params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    batch = collate(rows, 0)
    losses = []
    twin.train()
    for _ in range(config.steps or 0):
        loss = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def ours_vs_peft(config: TrainConfig, **load: Any) -> tuple[list[float], list[float]]:
    model, tokenizer = load_base(TINY, **load)
    rows = examples(tokenizer)
    inject(model, config)
    record = Losses()
    twin_base, _ = load_base(TINY, **load)  # the same base, quantized the same way (deterministic)
    theirs = peft_losses(twin_base, model, rows, config)
    train(model, rows, config, callbacks=[record])
    return record.losses, theirs


def config(**kw: Any) -> TrainConfig:
    base = dict(targets=tuple(TARGETS), rank=4, alpha=8, lr=2e-2, steps=4, batch_size=6, schedule="constant",
                max_grad_norm=None)  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_takes_the_steps_peft_takes_on_the_same_quantized_base(quantize: str) -> None:
    ours, theirs = ours_vs_peft(config(quantize=quantize), quantize=quantize)
    assert ours[-1] < 0.9 * ours[0]  # it learns through the quantized layers
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


def test_bf16_base_takes_the_steps_peft_takes_on_the_same_base() -> None:
    ours, theirs = ours_vs_peft(config(base_dtype="bf16"), dtype="bf16")
    assert ours[-1] < 0.9 * ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-2, atol=0)  # bf16 rounding


@pytest.mark.parametrize(
    ("load", "weight_dtype"), [({"dtype": "bf16"}, torch.bfloat16), ({"quantize": "fp4"}, torch.uint8)]
)
def test_base_is_held_as_asked_and_the_factors_stay_float32(load: dict[str, Any], weight_dtype: torch.dtype) -> None:
    model, _ = load_base(TINY, **load)
    inject(model, TrainConfig(targets="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == weight_dtype
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert model.lm_head.weight.dtype == (torch.bfloat16 if "dtype" in load else torch.float32)  # head unquantized


@pytest.mark.parametrize("load", [{"base_dtype": "bf16"}, {"quantize": "nf4"}])
def test_train_adapter_saves_a_peft_adapter_with_the_files_fingerprint(tmp_path: Path, load: dict[str, Any]) -> None:
    from loractl.formats import load_adapter
    from loractl.io.checkpoint import Checkpoint

    cfg = TrainConfig(targets="all-linear", rank=4, steps=2, batch_size=4, **load)  # type: ignore[arg-type]
    summary = train_adapter(TINY, FIXTURES / "data" / "train.jsonl", tmp_path / "out", cfg)
    adapter = load_adapter(tmp_path / "out")
    with Checkpoint(TINY) as ckpt:
        assert adapter.meta.base_fingerprint == ckpt.fingerprint([f"{m}.weight" for m in adapter.modules])
    assert adapter.meta.base_fingerprint is not None
    entry = adapter.lineage[-1]
    assert {k: entry["params"][k] for k in load} == load  # the lineage says how the base was held
    assert summary.result.steps == 2
    config_doc = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config_doc["r"] == 4  # an ordinary PEFT adapter
    peft_model = peft.PeftModel.from_pretrained(load_base(TINY)[0], tmp_path / "out")
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n) == len(adapter.modules)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_parameter_counts_are_peft_s_on_a_quantized_base(quantize: str) -> None:
    """A 4-bit weight packs two parameters per byte: the total is the base's real count, as PEFT says."""
    plain, _ = load_base(TINY)
    injection = inject(plain, config())
    model, _ = load_base(TINY, quantize=quantize)
    ours = inject(model, config())
    twin, _ = load_base(TINY, quantize=quantize)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    theirs = peft.get_peft_model(twin, lora).get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == theirs == (injection.trainable, injection.total)  # was 4.87% of too few
    sizes: list[dict[str, Any]] = []

    class Sizes(Callback):
        def on_start(self, info: dict[str, Any]) -> None:
            sizes.append(info)

    train(model, examples(load_base(TINY)[1]), config(quantize=quantize, steps=1), callbacks=[Sizes()])
    assert (sizes[0]["trainable"], sizes[0]["total"]) == theirs
