"""rescale: --scale multiplies ΔW, --alpha keeps it; written alphas, DoRA, lineage, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loractl
from loractl.adapter import Adapter
from loractl.cli import main
from loractl.errors import AdapterError, UsageError
from loractl.ops.rescale import rescale
from tests.helpers import random_module

adapters_st = st.builds(
    lambda seed, rank, rs: Adapter(
        modules={"x": replace(random_module(9, 7, rank, seed=seed), scale_rule="alpha/sqrt(r)" if rs else "alpha/r")}
    ),
    st.integers(0, 999),
    st.integers(1, 6),
    st.booleans(),
)


@given(adapters_st, st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3))
def test_scale_multiplies_delta_and_keeps_factors(adapter: Adapter, factor: float) -> None:
    m = adapter.modules["x"]
    out = rescale(adapter, scale=factor).adapter.modules["x"]
    assert torch.equal(out.A, m.A) and torch.equal(out.B, m.B)
    assert torch.allclose(out.delta_weight().double(), factor * m.delta_weight().double(), rtol=1e-6, atol=1e-6)


@given(adapters_st, st.floats(0.1, 256))
def test_alpha_keeps_delta(adapter: Adapter, alpha: float) -> None:
    m = adapter.modules["x"]
    out = rescale(adapter, alpha=alpha).adapter.modules["x"]
    expected_scale = alpha / (m.rank**0.5 if m.scale_rule == "alpha/sqrt(r)" else m.rank)
    assert out.alpha == alpha and out.scale == pytest.approx(expected_scale, rel=1e-15)
    assert torch.equal(out.A, m.A)
    dense = m.delta_weight().double()
    assert float((out.delta_weight().double() - dense).norm() / dense.norm()) < 1e-6


def test_alpha_is_what_the_file_says(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "adapters" / "tiny-patterns"  # rsLoRA with rank and alpha patterns
    assert main(["rescale", str(src), "-o", str(tmp_path / "a"), "--alpha", "5"]) is None
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 5 and config["use_rslora"] and not config["alpha_pattern"]
    before, after = loractl.load_adapter(src), loractl.load_adapter(tmp_path / "a")
    for name, m in after.modules.items():
        ref = before.modules[name].delta_weight().double()
        assert float((m.delta_weight().double() - ref).norm() / ref.norm()) < 1e-6
    assert after.lineage[-1]["op"] == "rescale" and after.lineage[-1]["params"] == {"alpha": 5.0}
    assert after.lineage[-1]["parents"] == [before.content_hash()]


def test_dora_scale_refused_alpha_allowed(fixtures_dir: Path) -> None:
    dora = loractl.load_adapter(fixtures_dir / "adapters" / "tiny-dora")
    with pytest.raises(AdapterError, match="DoRA"):
        rescale(dora, scale=2.0)
    out = rescale(dora, alpha=8.0).adapter
    for name, m in out.modules.items():
        assert torch.allclose(m.delta_weight(), dora.modules[name].delta_weight(), rtol=1e-5, atol=1e-7)
        assert torch.equal(m.magnitude, dora.modules[name].magnitude)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "text"), [({}, "exactly one"), ({"scale": 1.0, "alpha": 2.0}, "exactly one"),
                                          ({"scale": 0.0}, "non-zero"), ({"alpha": float("nan")}, "finite")])  # fmt: skip
def test_bad_arguments(kw: dict[str, float], text: str) -> None:
    with pytest.raises(UsageError, match=text):
        rescale(Adapter(modules={"x": random_module(4, 4, 2)}), **kw)


def test_cli_rescale_scale(fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = fixtures_dir / "adapters" / "tiny-qv"
    main(["rescale", str(src), "-o", str(tmp_path / "h"), "--scale", "0.5", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "peft" and len(doc["modules"]) == 4
    before, after = loractl.load_adapter(src), loractl.load_adapter(tmp_path / "h")
    for name, m in after.modules.items():
        assert torch.allclose(m.delta_weight(), 0.5 * before.modules[name].delta_weight(), rtol=1e-6)
    with pytest.raises(SystemExit) as exit_info:
        main(["rescale", str(src), "-o", str(tmp_path / "x"), "--scale", "1", "--alpha", "2"])
    assert exit_info.value.code == 2 and "exactly one" in capsys.readouterr().err


def test_cli_to_scale_is_the_target_and_scale_then_reads_the_input(tmp_path: Path) -> None:
    """--to-scale names the target; beside it, --scale is the input's (an old mlx .npz stores none)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 2), dtype=np.float32), rng.standard_normal((2, 6), dtype=np.float32)
    src = tmp_path / "adapters.npz"
    np.savez(src, **{"layers.0.attention.wq.lora_a": a, "layers.0.attention.wq.lora_b": b})
    main(["rescale", str(src), "-o", str(tmp_path / "half"), "--to-scale", "0.5", "--scale", "20", "--to", "peft"])
    (m,) = loractl.load_adapter(tmp_path / "half").modules.values()
    dense = torch.from_numpy(b).T.double() @ torch.from_numpy(a).T.double()
    assert torch.allclose(m.delta_weight().double(), 10.0 * dense, rtol=1e-6, atol=1e-6 * float(dense.norm()))
