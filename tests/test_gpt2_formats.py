"""A GPT-2 adapter across formats (issue 22 items 7, 8 and 9).

GPT-2's `transformer.h.N` is a language model, not a diffusion pipeline's `transformer` component;
mlx-lm names GPT-2's modules `model.h.N`; and GPT-2's `fan_in_fan_out` (Conv1D) flag is a layout
note: the factors are the same, so kohya and GGUF keep it in loractl's record and PEFT gives the same
logits after the round trip. The adapter is made by PEFT itself on a tiny random GPT-2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import qv_adapter, random_module, run_cli
from interop_models import tiny_gpt2
from safetensors.torch import load_file, save_file

from loractl.adapter import Adapter, AdapterMeta
from loractl.errors import AdapterError
from loractl.formats import load_adapter, save_adapter
from loractl.formats.options import ReadOptions

MODULES = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
IDS = [[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32]]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base directory, PEFT adapter directory): a 2-layer GPT-2 and a LoRA on its Conv1D layers."""
    root = tmp_path_factory.mktemp("gpt2")
    base, _ = tiny_gpt2(root)
    return base, root / "peft"


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.double()


@pytest.mark.parametrize("to", ["kohya", "gguf"])
def test_the_conv1d_flag_is_a_layout_note_not_a_loss(to: str, gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    base, peft = gpt2
    out = tmp_path / f"a.{'gguf' if to == 'gguf' else 'safetensors'}"
    code, stdout, err = run_cli("convert", peft, "--to", to, "-o", out, "--base", base)  # no --allow-loss
    assert code == 0, err
    assert "lost:" not in err and "LOSSY" not in stdout
    back = load_adapter(out, options=ReadOptions(base=base))
    assert set(back.modules) == MODULES and all(m.fan_in_fan_out for m in back.modules.values())

    code, _, err = run_cli("convert", out, "--to", "peft", "-o", tmp_path / "back", "--base", base)
    assert code == 0, err
    source, round_trip = _peft_logits(base, peft), _peft_logits(base, tmp_path / "back")
    assert float((round_trip - source).norm() / source.norm()) < 1e-6  # float32 rounding of a folded alpha


def test_a_loss_measured_with_base_never_asks_for_base(gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    """loralib has no place for the flag: a real loss, and with --base given the message says why it is unmeasured."""
    base, peft = gpt2
    code, _, err = run_cli("convert", peft, "--to", "loralib", "-o", tmp_path / "t.bin", "--base", base)
    assert code != 0 and "fan_in_fan_out" in err, err
    assert "give --base" not in err


def test_gpt2_is_not_a_diffusion_pipeline(gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    _, peft = gpt2
    code, _, err = run_cli("convert", peft, "--to", "diffusers", "-o", tmp_path / "d", "--allow-loss")
    assert code != 0 and "is a language model's, not a diffusion transformer's" in err, err
    assert not (tmp_path / "d").exists()

    code, out, err = run_cli("validate", peft, "--target", "diffusers")
    assert code == 1 and "language model's module" in out, out + err
    assert "convert --to diffusers" not in out + err

    weights = load_file(next(peft.glob("*.safetensors")))
    unprefixed = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    (tmp_path / "dir").mkdir()
    save_file(unprefixed, tmp_path / "dir" / "pytorch_lora_weights.safetensors")
    code, out, err = run_cli("validate", tmp_path / "dir", "--target", "diffusers")
    assert code == 1 and "language model's module" in out, out + err


def test_a_diffusion_transformer_in_a_peft_file_is_still_sent_to_diffusers(tmp_path: Path) -> None:
    """The control: Flux's `transformer.transformer_blocks.N` is a pipeline component."""
    module = "transformer.transformer_blocks.0.attn.to_q"
    save_adapter(Adapter(modules={module: random_module(16, 16, 2)}, meta=AdapterMeta()), tmp_path / "flux")
    code, out, _ = run_cli("validate", tmp_path / "flux", "--target", "diffusers")
    assert code == 1 and "convert --to diffusers" in out
    code, _, err = run_cli("convert", tmp_path / "flux", "--to", "diffusers", "-o", tmp_path / "d")
    assert code == 0, err


def _mlx_config(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((path / "adapter_config.json").read_text())
    return doc


def test_gpt2_to_mlx_gets_mlx_lm_names_and_the_layers_it_adapts(gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    _, peft = gpt2
    code, _, err = run_cli("convert", peft, "--to", "mlx", "-o", tmp_path / "mlx")
    assert code == 0, err
    keys = set(load_file(tmp_path / "mlx" / "adapters.safetensors"))
    assert keys == {f"{m.replace('transformer.', 'model.', 1)}.lora_{x}" for m in MODULES for x in "ab"}
    config = _mlx_config(tmp_path / "mlx")
    assert config["num_layers"] == 2 and config["lora_parameters"]["keys"] == [
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_proj",
    ]
    back = load_adapter(tmp_path / "mlx")
    assert set(back.modules) == MODULES and all(m.fan_in_fan_out for m in back.modules.values())


def test_transformer_h_of_an_unknown_family_is_refused_for_mlx(tmp_path: Path) -> None:
    """GPT-BigCode keeps `transformer.h.N` in mlx-lm, GPT-2 does not: without the Conv1D flag or a base, refuse."""
    adapter = Adapter(modules={"transformer.h.0.attn.c_attn": random_module(96, 32, 2)}, meta=AdapterMeta())
    with pytest.raises(AdapterError, match="GPT-BigCode") as e:
        save_adapter(adapter, tmp_path / "mlx", format="mlx")
    assert e.value.hint is not None and "--base" in e.value.hint
    assert not (tmp_path / "mlx").exists()


def test_mlx_num_layers_is_the_layers_adapted_not_minus_one(tmp_path: Path) -> None:
    save_adapter(qv_adapter(layers=3), tmp_path / "mlx", format="mlx")
    assert _mlx_config(tmp_path / "mlx")["num_layers"] == 3


def test_resizing_a_2024_mlx_file_keeps_its_schema(tmp_path: Path) -> None:
    save_adapter(qv_adapter(layers=2), tmp_path / "old", format="mlx")
    config = _mlx_config(tmp_path / "old")
    config["lora_layers"] = config.pop("num_layers")  # before mlx-lm #903 (2024-09-30)
    config["use_dora"] = config.pop("fine_tune_type") == "dora"
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))

    code, _, err = run_cli("resize", tmp_path / "old", "--rank", "2", "-o", tmp_path / "small")
    assert code == 0, err
    resized = _mlx_config(tmp_path / "small")
    assert resized["lora_layers"] == 2 and resized["use_dora"] is False
    assert "num_layers" not in resized and "fine_tune_type" not in resized


def test_validate_target_mlx_flags_transformers_names_mlx_lm_refuses(gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    """The file earlier versions wrote (GPT-2 under `transformer.h.N`): mlx-lm refuses it (test_interop_mlx.py)."""
    base, peft = gpt2
    assert run_cli("convert", peft, "--to", "mlx", "-o", tmp_path / "mlx")[0] == 0
    code, out, err = run_cli("validate", tmp_path / "mlx", "--target", "mlx", "--base", base)
    assert code == 0, out + err
    weights = tmp_path / "mlx" / "adapters.safetensors"
    save_file({k.replace("model.", "transformer.", 1): v for k, v in load_file(weights).items()}, weights)
    code, out, err = run_cli("validate", tmp_path / "mlx", "--target", "mlx", "--base", base)
    assert code == 1 and "mlx-lm names this module 'model.h.0.attn.c_attn'" in out, out + err


def test_gpt_neox_gets_mlx_lm_names_and_reads_back(tmp_path: Path) -> None:
    modules = {f"gpt_neox.layers.{i}.attention.query_key_value": random_module(48, 16, 2, seed=i) for i in range(2)}
    save_adapter(Adapter(modules=modules, meta=AdapterMeta()), tmp_path / "mlx", format="mlx")
    keys = set(load_file(tmp_path / "mlx" / "adapters.safetensors"))
    assert keys == {f"model.h.{i}.attention.query_key_value.lora_{x}" for i in range(2) for x in "ab"}
    assert set(load_adapter(tmp_path / "mlx").modules) == set(modules)
