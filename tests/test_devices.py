"""--device for extract, resize and combine: every choice this machine has gives the CPU's adapter,
and a device it lacks, or an unknown name, is one clear error with nothing written.

(merge's --device is in test_merge_streaming.py.) On a machine with CUDA or MPS, `auto` picks it,
and the comparison below then checks the device path against the CPU within float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loractl.adapter import Adapter
from loractl.errors import UsageError
from loractl.formats import load_adapter, save_adapter
from loractl.ops.combine import CombineOptions, combine
from loractl.ops.lowrank import RankRule
from loractl.ops.resize import resize
from tests.helpers import random_module, run_cli
from tests.test_extract import make_pair

ON_CPU = not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight().double() for n, m in adapter.modules.items()}


def _assert_same(a: Adapter, b: Adapter) -> None:
    da, db = _deltas(a), _deltas(b)
    assert da.keys() == db.keys()
    for n in da:
        if ON_CPU:  # auto is the CPU here: the very same arithmetic
            assert torch.equal(da[n], db[n]), n
        else:
            assert float((da[n] - db[n]).norm()) <= 1e-5 * float(da[n].norm()), n


def _adapters() -> list[Adapter]:
    return [
        Adapter(modules={"x": random_module(48, 40, 8, seed=s), "y": random_module(24, 40, 4, seed=s + 9)})
        for s in (1, 2)
    ]


def test_resize_and_combine_on_auto_equal_the_cpu() -> None:
    a, b = _adapters()
    _assert_same(resize(a, RankRule(rank=3)).adapter, resize(a, RankRule(rank=3), device="auto").adapter)
    for method in ("svd", "ties"):
        options = CombineOptions(method=method, rule=RankRule(rank=4), density=0.5 if method == "ties" else None)
        _assert_same(combine([a, b], options).adapter, combine([a, b], options, device="auto").adapter)


def test_extract_on_auto_equals_the_cpu(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    for device in ("cpu", "auto"):
        code, _, err = run_cli("extract", base, ft, "-o", tmp_path / device, "--rank", "4", "--device", device)
        assert code == 0, err
    _assert_same(load_adapter(tmp_path / "cpu"), load_adapter(tmp_path / "auto"))


@pytest.mark.parametrize("command", ["resize", "combine", "extract"])
def test_unknown_or_absent_devices_are_refused_and_nothing_is_written(tmp_path: Path, command: str) -> None:
    a, b = _adapters()
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    base, ft = make_pair(tmp_path / "pair")
    inputs = {"resize": ["a", "--rank", "2"], "combine": ["a", "b", "--method", "svd"], "extract": []}[command]
    args = [str(tmp_path / i) if i in ("a", "b") else i for i in inputs]
    if command == "extract":
        args = [str(base), str(ft), "--rank", "2"]
    code, _, err = run_cli(command, *args, "-o", tmp_path / "out", "--device", "tpu")
    assert code != 0 and "unknown device 'tpu'" in err and "hint:" in err
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        code, _, err = run_cli(command, *args, "-o", tmp_path / "out", "--device", "cuda")
        assert code != 0 and "no CUDA GPU" in err and not (tmp_path / "out").exists()


def test_resolve_device() -> None:
    from loractl.ops.devices import float64_device, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("AUTO").type in ("cpu", "cuda", "mps")
    assert float64_device(torch.device("mps")) == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("gpu")
