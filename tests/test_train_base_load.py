"""`load_base` reads a local checkpoint tensor by tensor (pread) and gets exactly what transformers' own load gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from oracles import oracle

from loractl.train.base import load_base, quantization_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny-llama"  # float32, untied head
DATA = FIXTURES / "data" / "train.jsonl"


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


def _offline_run(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`loractl ARGV…` with an empty (or prepared) HF cache under tmp_path and the Hub settings in `env`."""
    settings = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), **env}
    return subprocess.run([sys.executable, "-m", "loractl", *argv], capture_output=True, text=True, env=settings)


@pytest.mark.parametrize(
    "env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"]
)
def test_a_hub_base_that_cannot_be_reached_is_one_error(tmp_path: Path, env: dict[str, str]) -> None:
    """Not huggingface_hub's 11 retry warnings over ~30 s: one request, then one error and its hint."""
    started = time.monotonic()
    done = _offline_run(tmp_path, "eval", "someorg/some-model", "--data", str(DATA), **env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "error: cannot reach the Hub for base someorg/some-model, and the local cache does not hold it",
        "hint: give a local model directory, or run once with the Hub reachable so that it is cached",
    ]
    assert time.monotonic() - started < 20


def test_a_cached_hub_base_loads_offline(tmp_path: Path) -> None:
    """The HF cache's snapshot of the id is what loads when the Hub cannot be reached."""
    sha = "0" * 40
    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(TINY, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    done = _offline_run(tmp_path, "eval", "someorg/tiny", "--data", str(DATA), "--json", HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["loss"] > 0
