"""Every flag a message names exists on the command that prints it.

Each adapter-reading command is fed the inputs whose readers ask for a flag (a pickle: --allow-pickle;
loralib without alpha: --alpha; an old mlx .npz: --scale; kohya names without a reading: --base;
an unknown file: --from). Every `--flag` in the output must be an option of that command; then the
named flags are passed (with a value where they take one) until the reader asks for nothing new,
so a flag that is listed but rejected would fail too.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from loractl.cli import COMMANDS
from loractl.formats import save_adapter
from tests.helpers import qv_adapter, run_cli, tiny_base

FLAG = re.compile(r"--[\w-]+")
QUOTED_COMMAND = re.compile(r"'loractl [^']*'")  # a suggestion to run another command names its flags
VALUES = {"--alpha": "16", "--scale": "2", "--base": None, "--from": None}


def _loralib_pickle(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    state = {"enc.q.lora_A": torch.randn(2, 8, generator=g), "enc.q.lora_B": torch.randn(8, 2, generator=g)}
    torch.save(state, root / "l.bin")
    return root / "l.bin"


def _old_npz(root: Path) -> Path:
    rng = np.random.default_rng(0)
    leaves = {"lora_a": rng.standard_normal((8, 2), dtype=np.float32), "lora_b": np.ones((2, 6), np.float32)}
    np.savez(root / "adapters.npz", **{f"layers.0.attention.wq.{k}": v for k, v in leaves.items()})
    return root / "adapters.npz"


def _unreadable_kohya_names(root: Path) -> Path:
    stem = "lora_unet_zzq_yyw_qqx"
    tensors = {f"{stem}.lora_down.weight": torch.ones(2, 8), f"{stem}.lora_up.weight": torch.ones(8, 2)}
    save_file({**tensors, f"{stem}.alpha": torch.tensor(2.0)}, root / "k.safetensors")
    return root / "k.safetensors"


def _unknown(root: Path) -> Path:
    (root / "notes.txt").write_text("not an adapter")
    return root / "notes.txt"


INPUTS: dict[str, Callable[[Path], Path]] = {
    "pickle, then alpha": _loralib_pickle,
    "scale": _old_npz,
    "base": _unreadable_kohya_names,
    "from": _unknown,
}


def _argv(command: str, adapter: Path, tmp: Path) -> list[str | Path]:
    out = tmp / "out"
    return {
        "inspect": ["inspect", adapter],
        "validate": ["validate", adapter],
        "convert": ["convert", adapter, "-o", out, "--to", "peft"],
        "merge": ["merge", tmp / "base", adapter, "-o", out],
        "combine": ["combine", adapter, "-o", out],
        "resize": ["resize", adapter, "-o", out, "--rank", "1"],
        "rescale": ["rescale", adapter, "-o", out, "--to-scale", "0.5"],
        "push": ["push", adapter, f"file://{tmp}/registry/alice/lora", "--create"],
    }[command]


def _named_flags(text: str) -> set[str]:
    """The loractl flags a message names (another program's `--lora_alpha` is not one)."""
    return {f for f in FLAG.findall(QUOTED_COMMAND.sub("", text)) if "_" not in f}


def _options(command: str) -> set[str]:
    module = importlib.import_module(f"loractl.cli.{COMMANDS[command]}")
    return {opt for p in module.command.params for opt in p.opts}


@pytest.mark.parametrize("case", list(INPUTS))
@pytest.mark.parametrize("command", ["inspect", "validate", "convert", "merge", "combine", "resize", "rescale", "push"])
def test_every_flag_a_message_names_exists_on_the_command(command: str, case: str, tmp_path: Path) -> None:
    tiny_base(tmp_path / "base", {"enc.q.weight": (8, 8)})
    adapter = INPUTS[case](tmp_path)
    argv, seen = _argv(command, adapter, tmp_path), set()
    for _ in range(3):
        code, out, err = run_cli(*argv)
        named = _named_flags(out + err) - seen
        assert named <= _options(command), f"{command} names {named - _options(command)}: {out}{err}"
        assert "no such option" not in err.lower()
        if code == 0 or not named:
            break
        seen |= named
        for flag in sorted(named):
            value = VALUES.get(flag, "")
            argv += [flag] if value == "" else [flag, value or (tmp_path / "base" if flag == "--base" else "peft")]
    # validate reports findings without their hints, and merge reads with its BASE argument already:
    # those may name nothing; every other pair must have asked for a flag
    quiet = command == "validate" or (command, case) == ("merge", "base")
    assert seen or quiet, f"{command} on the {case} input named no flag: {out}{err}"


def test_pull_names_only_its_own_flags(tmp_path: Path) -> None:
    """A pickled adapter pushed with --allow-pickle needs it again to be verified when pulled."""
    adapter = tmp_path / "adapter"
    save_adapter(qv_adapter(), adapter)
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    registry = f"file://{tmp_path}/registry/alice/lora"
    assert run_cli("push", adapter, registry, "--create", "--allow-pickle")[0] == 0
    code, out, err = run_cli("pull", registry, "-o", tmp_path / "pulled")
    assert code != 0 and _named_flags(out + err) == {"--allow-pickle"} <= _options("pull")
    assert run_cli("pull", registry, "-o", tmp_path / "pulled", "--allow-pickle")[0] == 0
