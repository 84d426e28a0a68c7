"""No code execution: a malicious pickle runs nothing, with or without `--allow-pickle`.

The payload is a `__reduce__` that calls `exec` to create a marker file. Every format that
can read a pickle (PEFT `adapter_model.bin`, torchtune `adapter_model.pt`, loralib `.bin`)
gets it in torch's zip container and as a legacy raw pickle. Without `--allow-pickle` the
file is refused before unpickling; with it, `torch.load(weights_only=True)` refuses the
`exec` global. Detection reads pickle opcodes without executing them.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES

from loractl.cli import main
from loractl.errors import FormatError, PickleRefusedError
from loractl.formats import describe_adapter, detect_format, load_adapter
from loractl.formats.options import ReadOptions

KEYS = {
    "peft": ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "adapter_model.bin"),
    "torchtune": ("layers.0.attn.q_proj.lora_a.weight", "adapter_model.pt"),
    "loralib": ("encoder.layer.0.attention.self.query.lora_A", "lora.bin"),
}


class Payload:
    """Unpickling this runs `exec(code)`: here, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


def _hostile(tmp_path: Path, fmt: str, container: str) -> tuple[Path, Path]:
    """(the path to read, the marker the payload would create)."""
    marker = tmp_path / "PWNED"
    key, name = KEYS[fmt]
    root = tmp_path / fmt
    if fmt == "peft":
        shutil.copytree(FIXTURES / "adapters" / "tiny-qv", root)
        (root / "adapter_model.safetensors").unlink()
    else:
        root.mkdir()
    state = {key: torch.zeros(4, 8), key.replace("_A", "_B").replace("lora_a", "lora_b"): Payload(marker)}
    target = root / name
    if container == "zip":
        torch.save(state, target)
    else:
        target.write_bytes(pickle.dumps(state, protocol=2))
    return (root if fmt != "loralib" else target), marker


def test_the_payload_really_runs_when_unpickled_plainly(tmp_path: Path) -> None:
    """The control: the marker mechanism works, so its absence below means something."""
    path, marker = _hostile(tmp_path, "loralib", "raw")
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("container", ["zip", "raw"])
@pytest.mark.parametrize("fmt", sorted(KEYS))
def test_malicious_pickle_runs_nothing(tmp_path: Path, fmt: str, container: str) -> None:
    path, marker = _hostile(tmp_path, fmt, container)
    if container == "zip" or fmt == "peft":  # detection of a raw pickle sees no keys: no format claims it
        assert detect_format(path) == fmt
    options = ReadOptions(alpha=None if fmt == "peft" else 8.0, base=FIXTURES / "tiny-llama")  # peft records its own
    for read in (describe_adapter, load_adapter):
        with pytest.raises(PickleRefusedError, match="pickle"):
            read(path, format=fmt, options=options)
        with pytest.raises(FormatError, match="cannot load pickle safely"):
            read(path, format=fmt, allow_pickle=True, options=options)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", sorted(KEYS))
def test_cli_refuses_then_loads_weights_only(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    path, marker = _hostile(tmp_path, fmt, "zip")
    extra = ["--alpha", "8"] if fmt != "peft" else []
    for flags, expected in (([], "--allow-pickle"), (["--allow-pickle"], "cannot load pickle safely")):
        with pytest.raises(SystemExit) as e:
            main(["inspect", str(path), *flags, *extra])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and expected in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["validate", str(path), "--allow-pickle", "--json"])
    assert e.value.code == 1 and "unreadable" in capsys.readouterr().out
    assert not marker.exists()
