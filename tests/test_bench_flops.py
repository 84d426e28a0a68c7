"""bench/flops.py: the model-FLOP count bench/train.py divides by the step time, against torch's own FLOP counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loractl.train import Example, TrainConfig, inject, train

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1000}


def test_step_flops_match_torch_s_count_of_a_loractl_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's counter sees every matmul of one loractl step but not the CPU attention kernel; with attention
    added from the formula the counts agree within 5 %: the formula also counts the first layer's attention
    input gradients, which autograd skips (the embeddings are frozen)."""
    monkeypatch.syspath_prepend(str(BENCH))
    from flops import step_flops
    from random_llama import build_model, llama_config

    torch.manual_seed(0)
    model = build_model(llama_config(SHAPE, torch.float32, 64), torch.float32)
    batch, seq, rank = 4, 32, 8
    ids = torch.randint(0, SHAPE["vocab"], (batch, seq), generator=torch.Generator().manual_seed(1))
    config = TrainConfig(rank=rank, alpha=16, targets="all-linear", steps=1, batch_size=batch, max_len=seq)
    inject(model, config)
    with FlopCounterMode(display=False) as counter:
        train(model, [Example(tuple(r), tuple(r)) for r in ids.tolist()], config)
    attention = SHAPE["layers"] * 12 * batch * seq * seq * SHAPE["hidden"]
    expected = step_flops(SHAPE, batch=batch, seq=seq, rank=rank, label_share=(seq - 1) / seq)  # labels shift by one
    assert 0.95 * expected < counter.get_total_flops() + attention <= expected
    without_lora = step_flops(SHAPE, batch=batch, seq=seq, rank=0)
    assert counter.get_total_flops() + attention > without_lora  # the LoRA term is counted (a control)


@pytest.mark.parametrize("override", ["float32", "native"])
def test_the_bench_reports_the_matmul_dtype_base_matmul_used(monkeypatch: pytest.MonkeyPatch, override: str) -> None:
    """bench/train.py's `matmul_dtype`: PEFT's is the base weights' own, loractl's the one base_matmul took (here
    forced by LORACTL_BASE_MATMUL, so nothing is measured); it was once read from --base-dtype whatever ran."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("LORACTL_BASE_MATMUL", override)
    import train as bench_train  # bench/train.py
    from random_llama import build_model, llama_config

    monkeypatch.setattr("loractl.train.base_matmul.MEASURED", {})
    native = bench_train._native_dtype(build_model(llama_config(SHAPE, torch.bfloat16, 64), torch.bfloat16))
    assert native == torch.bfloat16
    for variant, expected in (("loractl", "float32" if override == "float32" else "bfloat16"), ("peft", "bfloat16")):
        args = argparse.Namespace(variant=variant, base_dtype=None)  # the dtype is the weights', not the flag's
        assert bench_train._matmul_dtype(args, native) == expected


def test_train_table_prints_a_dash_where_no_peft_twin_ran(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loractl-only run has no PEFT twin: its ratio columns say "—", not "nanx"."""
    monkeypatch.syspath_prepend(str(BENCH))
    import train as bench_train

    run = {"tokens_per_s": 100.0, "peak_rss": 2e9, "step_s": 4.0, "cpu_s": 8.0, "trainable": 10, "total": 1000}
    bench_train._table({"loractl": [run]})
    row = capsys.readouterr().out.splitlines()[-1]
    assert "nan" not in row and row.count("—") == 3
    bench_train._table({"loractl": [run], "peft": [{**run, "tokens_per_s": 50.0, "cpu_s": 16.0}]})
    assert "| 2.00x | 8.00 | 2.00x |" in capsys.readouterr().out
