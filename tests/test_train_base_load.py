"""`load_base` reads a local checkpoint tensor by tensor (pread) and gets exactly what transformers' own load gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from oracles import oracle

from loractl.train.base import load_base, quantization_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny-llama"  # float32, untied head


def transformers_load(**options: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, device_map={"": "cpu"}, **options)


def assert_same_state(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_load_equals_transformers(dtype: str | None) -> None:
    ours, _ = load_base(TINY, dtype=dtype)  # type: ignore[arg-type]
    torch_dtype = torch.bfloat16 if dtype else torch.float32
    assert {p.dtype for p in ours.parameters()} == {torch_dtype}
    assert_same_state(ours, transformers_load(dtype=torch_dtype))


def test_quantized_load_equals_transformers() -> None:
    oracle("bitsandbytes", "bitsandbytes", "qlora")
    ours, _ = load_base(TINY, dtype="bf16", quantize="nf4")
    theirs = transformers_load(dtype=torch.bfloat16, quantization_config=quantization_config("nf4", torch.bfloat16))
    assert_same_state(ours, theirs)  # the packed nf4 bytes and their absmax included
    assert not ours.model.layers[0].self_attn.q_proj.weight.dtype.is_floating_point
