"""`validate --target`: what each consumer would refuse or drop, as findings with codes (issue 13 item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_module, run_cli

from loractl.adapter import Adapter, AdapterMeta
from loractl.consumer_rules import vllm_max_lora_rank
from loractl.formats import load_adapter, save_adapter
from loractl.io.safetensors_writer import save_tensors
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
    (rank,) = [f for f in validate_adapter(path, target="vllm").findings if f.code == "rank-above-limit"]
    assert rank.severity == "warning" and "--max-lora-rank 32 " in rank.message
    assert [vllm_max_lora_rank(r) for r in (1, 2, 12, 16, 17, 320, 321, 513)] == [1, 8, 16, 16, 32, 320, 512, None]
    huge = save_adapter(Adapter(modules={"model.layers.0.foo": random_module(8, 600, 513)}, meta=AdapterMeta()),
                        tmp_path / "huge", format="peft")  # fmt: skip
    (rank,) = [f for f in validate_adapter(huge, target="vllm").findings if f.code == "rank-above-limit"]
    assert rank.severity == "error" and "512" in rank.message
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


def test_severities_and_targets_follow_what_the_consumers_showed(tmp_path: Path) -> None:
    """(The interop tests show each with the real package.) A lora_B bias is refused by llama.cpp's converter and
    mlx-lm (error), vLLM refuses it and norms, llama.cpp skips norms too, diffusers applies embedding LoRA and loads no PEFT-layout key."""
    q, emb = "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder.embeddings.token_embedding"
    adapter = Adapter(
        modules={q: random_module(8, 8, 2, bias=torch.ones(8)), emb: random_module(8, 20, 2, kind="embedding")},
        full_tensors={"model.norm.weight": torch.ones(8)},
        meta=AdapterMeta(),
    )
    path = save_adapter(adapter, tmp_path / "peft", format="peft")
    found = {t: {(f.code, f.severity, f.module) for f in validate_adapter(path, target=t).findings}
             for t in ("llamacpp", "mlx", "diffusers", "vllm")}  # fmt: skip
    assert {("bias-dropped", "error", q), ("full-tensors-dropped", "error", None)} <= found["llamacpp"]
    assert {("bias-dropped", "error", q), ("full-tensors-dropped", "error", None)} <= found["mlx"]
    assert {("bias-dropped", "error", q), ("full-tensors-dropped", "error", None)} <= found["vllm"]  # it refuses
    assert found["diffusers"] == {("unknown-module", "error", q), ("unknown-module", "error", emb),
                                  ("full-tensors-dropped", "error", None)}  # fmt: skip


def test_diffusers_keys_without_a_component_are_flagged(tmp_path: Path) -> None:
    """loractl reads old attn-procs keys as the UNet's; diffusers loads nothing from them."""
    proc = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "procs.safetensors"
    save_tensors(path, {f"{proc}.down.weight": torch.randn(2, 8, generator=g),
                        f"{proc}.up.weight": torch.randn(8, 2, generator=g)})  # fmt: skip
    (finding,) = validate_adapter(path, target="diffusers").findings
    assert finding.code == "unknown-module" and proc in finding.message
    assert not _codes(save_adapter(load_adapter(path), tmp_path / "d.safetensors", format="diffusers"), "diffusers")
