"""Files people have (issue 13 item 6): an mlx-examples `adapters.npz` or a loralib `.bin` given as its directory
reads as the file, and the error names the missing flag instead of "not a LoRA adapter"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from loractl.formats import detect_format, load_adapter
from loractl.formats.options import ReadOptions


def _npz_dir(tmp_path: Path) -> Path:
    g = np.random.default_rng(0)
    d = tmp_path / "mlx-examples"
    d.mkdir()
    np.savez(d / "adapters.npz", **{
        "model.layers.0.self_attn.q_proj.lora_a": g.standard_normal((16, 4)).astype("f4"),
        "model.layers.0.self_attn.q_proj.lora_b": g.standard_normal((4, 16)).astype("f4"),
    })  # fmt: skip
    return d


def _bin_dir(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "loralib"
    d.mkdir()
    torch.save({"enc.q.lora_A": torch.randn(4, 16, generator=g), "enc.q.lora_B": torch.randn(16, 4, generator=g)},
               d / "lora.bin")  # fmt: skip
    return d


@pytest.mark.parametrize(
    ("make", "flags", "missing"),
    [(_npz_dir, ["--scale", "20"], "--scale"), (_bin_dir, ["--allow-pickle", "--alpha", "8"], "--alpha")],
)
def test_directory_reads_as_its_one_file(make, flags: list[str], missing: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = make(tmp_path)
    (file,) = d.iterdir()
    assert detect_format(d) == detect_format(file)
    pickle = flags[:1] if flags[0] == "--allow-pickle" else []
    for command in (["inspect", d], ["validate", d], ["convert", d, "--to", "peft", "-o", tmp_path / "x"]):
        code, out, err = run_cli(*command, *pickle)
        assert code != 0 and missing in out + err and "not a LoRA adapter" not in out + err, command
    code, _, err = run_cli("convert", d, "--to", "peft", "-o", tmp_path / "peft", *flags)
    assert code == 0, err
    filled = ReadOptions(allow_pickle=True, scale=20.0) if missing == "--scale" else ReadOptions(True, alpha=8)
    from_file = load_adapter(file, options=filled)  # each option only for the format that lacks it
    back = load_adapter(tmp_path / "peft")
    for name, m in from_file.modules.items():
        assert torch.equal(back.modules[name].delta_weight(), m.delta_weight())
