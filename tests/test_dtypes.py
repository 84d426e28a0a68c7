"""One dtype vocabulary: every command that takes --dtype reads the same names the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loractl.errors import UsageError
from loractl.formats import save_adapter
from loractl.io.dtypes import parse_dtype
from loractl.io.safetensors_header import read_header
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.extract import ExtractConfig, extract
from loractl.ops.merge_plan import plan_merge
from tests.helpers import qv_adapter, tiny_base

SPELLINGS = {
    "F32": ("float32", "fp32", "f32", "F32", "Float32"),
    "BF16": ("bfloat16", "bf16", "BF16"),
    "F16": ("float16", "fp16", "f16", "F16", "half", "HALF"),
}


@pytest.mark.parametrize(("code", "name"), [(c, n) for c, names in SPELLINGS.items() for n in names])
def test_every_spelling_names_one_code(code: str, name: str) -> None:
    assert parse_dtype(name) == code


@pytest.mark.parametrize("name", ["int8", "float64", "", "f8", "halfs"])
def test_unknown_names_are_refused_with_the_choices(name: str) -> None:
    with pytest.raises(UsageError, match="unknown dtype") as e:
        parse_dtype(name)
    assert e.value.hint == "choose float32, bfloat16 or float16"


def test_extract_and_merge_take_the_same_names(tmp_path: Path) -> None:
    """`merge --dtype half` worked and `extract --dtype half` did not: both read parse_dtype now."""
    shapes = {f"model.layers.{i}.self_attn.{p}.weight": (16, 16) for i in range(2) for p in ("q_proj", "v_proj")}
    base = tiny_base(tmp_path / "base", shapes)
    g = torch.Generator().manual_seed(1)
    (tmp_path / "ft").mkdir()
    save_tensors(
        tmp_path / "ft" / "model.safetensors",
        {k: torch.randn(s, generator=g) for k, s in shapes.items()},
    )
    extract(base, tmp_path / "ft", tmp_path / "lora", ExtractConfig(rank=2, dtype="half"))
    header = read_header(tmp_path / "lora" / "adapter_model.safetensors")
    assert {t.dtype for t in header.tensors.values()} == {"F16"}
    save_adapter(qv_adapter(), tmp_path / "qv")
    for name in ("half", "fp16", "float16"):
        assert plan_merge(base, [tmp_path / "qv"], dtype=name).dtype == "F16"
