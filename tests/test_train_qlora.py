"""Lower-precision bases: a bf16 base and bitsandbytes-quantized bases (QLoRA), each against PEFT on the same base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from oracles import oracle
from peft_twins import FIXTURES, TARGETS, TINY, config, examples, ours_vs_peft

from loractl.train import Callback, TrainConfig, inject, train, train_adapter
from loractl.train.base import load_base

peft = pytest.importorskip("peft")
oracle("bitsandbytes", "bitsandbytes", "qlora")

pytestmark = pytest.mark.usefixtures("one_thread")


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
