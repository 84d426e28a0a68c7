"""`validate --target`: what each consumer would refuse or drop, as findings with codes (issue 13 item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import random_module, run_cli

from loractl.adapter import Adapter, AdapterMeta
from loractl.formats import save_adapter
from loractl.validation import validate_adapter


def _codes(path: Path, target: str, base: Path | None = None) -> set[str]:
    return {f.code for f in validate_adapter(path, target=target, base=base).findings}


def test_dora_is_dropped_by_llama_cpp_and_vllm_but_not_mlx_peft_diffusers(fixtures_dir: Path) -> None:
    dora = fixtures_dir / "adapters" / "tiny-dora"
    assert "dora-dropped" in _codes(dora, "llamacpp") and "dora-dropped" in _codes(dora, "vllm")
    assert not _codes(dora, "mlx") and not _codes(dora, "peft")


def test_per_module_alpha_is_lost_by_llama_cpp_converter_only(fixtures_dir: Path) -> None:
    patterns, plain = fixtures_dir / "adapters" / "tiny-patterns", fixtures_dir / "adapters" / "tiny-qv"
    assert _codes(patterns, "llamacpp") == {"per-module-alpha"}
    assert not _codes(plain, "llamacpp", fixtures_dir / "tiny-llama")


def test_diffusers_rules(tmp_path: Path, fixtures_dir: Path) -> None:
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    mixed = Adapter(
        modules={f"{unet}.to_q": random_module(8, 8, 2, alpha=1.0), f"{unet}.to_k": random_module(8, 8, 2, alpha=4.0)},
        meta=AdapterMeta(),
    )
    kohya = save_adapter(mixed, tmp_path / "k.safetensors", format="kohya")
    assert _codes(kohya, "diffusers") == {"kohya-per-module-alpha"}
    assert not _codes(save_adapter(mixed, tmp_path / "d.safetensors", format="diffusers"), "diffusers")
    assert _codes(fixtures_dir / "adapters" / "tiny-qv", "diffusers") == {"unknown-module"}


def test_vllm_rank_limit_and_llama_cpp_unknown_module(tmp_path: Path, fixtures_dir: Path) -> None:
    adapter = Adapter(
        modules={
            "model.layers.0.self_attn.q_proj": random_module(64, 64, 32),
            "model.layers.0.foo": random_module(8, 8, 2),
        },
        meta=AdapterMeta(),
    )
    path = save_adapter(adapter, tmp_path / "peft", format="peft")
    assert "rank-above-limit" in _codes(path, "vllm")
    findings = validate_adapter(path, target="llamacpp", base=fixtures_dir / "tiny-llama").findings
    assert [f.module for f in findings if f.code == "unknown-module"] == ["model.layers.0.foo"]


@pytest.mark.parametrize("output", ["text", "json"])
def test_cli_target_reports_the_way_out(fixtures_dir: Path, output: str) -> None:
    code, out, _ = run_cli(
        "validate", fixtures_dir / "adapters" / "tiny-dora", "--target", "llamacpp", "--format", output
    )
    assert code == 1
    if output == "json":
        assert {f["code"] for f in json.loads(out)["reports"][0]["findings"]} == {"dora-dropped"}
    else:
        assert "loractl merge" in out
