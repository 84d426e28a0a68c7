"""Nothing read is invented (issue 22 items 5 and 6).

A forced format (`--from loralib --alpha 16`, as the unknown-format hint suggests) on a file that
holds no LoRA pair reads zero modules: that is never an adapter, so no command says ok or writes
one, and the error says what the file holds (the 2023 lora_diffusion "safeloras" layout by name).
`--alpha`/`--scale` fill only what a file lacks: for a file that records its own they are refused,
or given per input as `--alpha PATH=16`, never silently applied.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import qv_adapter, random_module, run_cli
from safetensors.torch import save_file

from loractl.adapter import Adapter, AdapterMeta
from loractl.errors import AdapterError
from loractl.formats import load_adapter, save_adapter
from loractl.formats.options import ReadOptions
from loractl.ops.diff import diff


def _vit_lora(root: Path) -> Path:
    """JamesQFreeman/LoRA-ViT's layout: `w_a_{i:03d}` / `w_b_{i:03d}` for timm's fused qkv, no module names."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"w_a_{i:03d}": torch.randn(4, 16, generator=g) for i in range(6)}
    tensors |= {f"w_b_{i:03d}": torch.randn(16, 4, generator=g) for i in range(6)}
    save_file(tensors, root / "vit_lora.safetensors")
    return root / "vit_lora.safetensors"


def _safeloras(root: Path) -> Path:
    """cloneofsimo/lora's `save_safeloras_with_embeds`: `{model}:{i}:up|down`, ranks and targets in the metadata."""
    g = torch.Generator().manual_seed(1)
    tensors, metadata = {}, {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"])}
    metadata["text_encoder"] = json.dumps(["CLIPAttention"])
    for model, count in (("unet", 3), ("text_encoder", 2)):
        for i in range(count):
            tensors[f"{model}:{i}:up"] = torch.randn(16, 2, generator=g)
            tensors[f"{model}:{i}:down"] = torch.randn(2, 16, generator=g)
            metadata[f"{model}:{i}:rank"] = "2"
    save_file(tensors, root / "lora.safetensors", metadata=metadata)
    return root / "lora.safetensors"


FORCED = {
    "inspect": ["inspect", "{file}", "--from", "loralib", "--alpha", "16"],
    "validate": ["validate", "{file}", "--from", "loralib", "--alpha", "16"],
    "convert": ["convert", "{file}", "--from", "loralib", "--alpha", "16", "--to", "peft", "-o", "{out}"],
    "resize": ["resize", "{file}", "--from", "loralib", "--alpha", "16", "--rank", "1", "-o", "{out}"],
}
KOHYA = ["convert", "{file}", "--from", "kohya", "--to", "peft", "-o", "{out}"]


def _run(args: list[str], file: Path, out: Path) -> tuple[int, str, str]:
    return run_cli(*(a.format(file=file, out=out) for a in args))


@pytest.mark.parametrize("command", FORCED)
def test_a_forced_format_on_a_file_without_lora_pairs_says_what_it_holds(command: str, tmp_path: Path) -> None:
    file, out = _vit_lora(tmp_path), tmp_path / "out"
    code, stdout, err = _run(FORCED[command], file, out)
    assert code != 0, stdout + err
    assert "12 tensors, none a LoRA pair (w_a_*, w_b_*)" in stdout + err
    assert "ok" not in stdout.split() and "0 modules" not in stdout + err and "rank 0" not in stdout + err
    assert not out.exists()


@pytest.mark.parametrize("command", [*FORCED, "kohya", "detected"])
def test_a_safeloras_file_is_named(command: str, tmp_path: Path) -> None:
    file, out = _safeloras(tmp_path), tmp_path / "out"
    args = {"detected": ["inspect", "{file}"], "kohya": KOHYA}.get(command) or FORCED[command]
    code, stdout, err = _run(args, file, out)
    assert code != 0 and not out.exists(), stdout + err
    assert "lora_diffusion 'safeloras' file: 5 LoRA modules numbered" in stdout + err
    assert "--from" not in (stdout + err).strip().splitlines()[-1]  # no format reads it: no hint to force one


def test_a_forced_loralib_pickle_without_pairs_is_refused(tmp_path: Path) -> None:
    torch.save({"head.weight": torch.ones(2, 4), "head.bias": torch.ones(2)}, tmp_path / "head.bin")
    code, out, err = run_cli("validate", tmp_path / "head.bin", "--from", "loralib", "--alpha", "16", "--allow-pickle")
    assert code == 1 and "2 tensors, none a LoRA pair (head.weight, head.bias)" in out + err


def test_an_adapter_without_modules_is_never_written(tmp_path: Path) -> None:
    empty = Adapter(modules={}, full_tensors={"score.weight": torch.ones(2, 4)}, meta=AdapterMeta())
    with pytest.raises(AdapterError, match="no LoRA module"):
        save_adapter(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _loralib_pair(root: Path) -> tuple[Path, Path]:
    """ORIG: a loralib state dict (no alpha stored); SMALL: loractl's resize of it, which records its own alpha."""
    g = torch.Generator().manual_seed(2)
    state = {"enc.q.lora_A": torch.randn(4, 16, generator=g), "enc.q.lora_B": torch.randn(16, 4, generator=g)}
    torch.save(state, root / "orig.bin")
    code, _, err = run_cli("resize", root / "orig.bin", "--alpha", "16", "--allow-pickle", "--rank", "2",
                           "-o", root / "small.bin")  # fmt: skip
    assert code == 0, err
    return root / "orig.bin", root / "small.bin"


def test_diff_refuses_an_alpha_for_the_file_that_records_one_and_takes_it_per_input(tmp_path: Path) -> None:
    orig, small = _loralib_pair(tmp_path)
    code, out, err = run_cli("diff", orig, small, "--alpha", "16", "--allow-pickle")
    assert code == 2 and "--alpha 16 contradicts the alpha 8.0 this file records" in err, out + err
    assert "small.bin" in err and "--alpha PATH=16" in err

    code, out, err = run_cli("diff", orig, small, "--alpha", f"{orig}=16", "--allow-pickle")
    assert code == 0, err
    truth = diff(
        load_adapter(orig, options=ReadOptions(allow_pickle=True, alpha=16)),
        load_adapter(small, options=ReadOptions(allow_pickle=True)),
    )
    assert truth.change is not None and 0.05 < truth.change < 0.95  # the rank-2 truncation, not 1
    assert f"overall change {truth.change:.3g}" in out


def test_inspect_refuses_an_alpha_the_file_contradicts(tmp_path: Path) -> None:
    save_adapter(qv_adapter(), tmp_path / "l.bin", format="loralib")  # records lora_alpha 8 (scale 2, rank 4)
    code, out, err = run_cli("inspect", tmp_path / "l.bin", "--alpha", "32", "--allow-pickle")
    assert code == 2 and "--alpha 32 contradicts the alpha 8.0" in err and "scale" not in out
    assert run_cli("inspect", tmp_path / "l.bin", "--alpha", "8", "--allow-pickle")[0] == 0  # agrees: harmless


@pytest.mark.parametrize("flag", ["--alpha", "--scale"])
def test_alpha_or_scale_for_a_format_that_records_its_own_is_refused(flag: str, tmp_path: Path) -> None:
    save_adapter(qv_adapter(), tmp_path / "peft")
    code, out, err = run_cli("inspect", tmp_path / "peft", flag, "32")
    assert code == 2 and f"{flag} 32 given, but peft adapters record their own {flag[2:]}" in err, out + err


def test_per_input_values_must_name_an_input_and_a_command_that_takes_them(tmp_path: Path) -> None:
    save_adapter(qv_adapter(), tmp_path / "a")
    code, _, err = run_cli("inspect", tmp_path / "a", "--alpha", "elsewhere=16")
    assert code == 2 and "'elsewhere' is not an input of this command" in err
    code, _, err = run_cli("rescale", tmp_path / "a", "-o", tmp_path / "b", "--alpha", f"{tmp_path / 'a'}=16")
    assert code == 2 and "one --alpha for all its inputs" in err


def test_old_mlx_npz_scale_is_still_filled(tmp_path: Path) -> None:
    """The control: a file that lacks its scale takes --scale."""
    import numpy as np

    m = random_module(6, 8, 2)
    np.savez(tmp_path / "adapters.npz", **{"layers.0.attention.wq.lora_a": m.A.T.numpy(),
                                            "layers.0.attention.wq.lora_b": m.B.T.numpy()})  # fmt: skip
    code, _, err = run_cli("inspect", tmp_path / "adapters.npz", "--scale", f"{tmp_path / 'adapters.npz'}=2")
    assert code == 0, err
    adapter = load_adapter(tmp_path / "adapters.npz", options=ReadOptions(scale=2))
    assert adapter.modules["layers.0.attention.wq"].scale == 2.0
