"""LyCORIS (lycoris-lora) writes LoHa and LoKr files; loractl reads them as the exact LoRA they equal
(issue 13 item 5): ΔW as LyCORIS' own modules apply it, PEFT running the converted file, truncation
errors equal to the dense float64 SVD tail, and merge equal to W + ΔW.

The oracle is the module's forward pass (`get_weight(shape) · scalar`, what ComfyUI/A1111 apply too):
lycoris-lora 4.1.3's `get_diff_weight` multiplies by the scale a second time (scale² · …) whenever
scale ≠ 1, and its `merge_to` goes through it (see docs/formats.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from interop_models import rel
from oracles import oracle

from loractl.errors import AdapterError
from loractl.formats import load_adapter
from loractl.formats.options import ReadOptions
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.convert import convert
from loractl.ops.lowrank import RankRule

pytestmark = pytest.mark.interop

# name → create_lycoris arguments; what each covers is in the comment
CONFIGS: dict[str, dict[str, Any]] = {
    # Linear, 3×3 conv and 1×1 conv with the kernel flattened into hada_w*_b (r, in·k·k)
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0},
    # the 3×3 conv through Tucker cores hada_t1/hada_t2
    "loha-tucker": {"algo": "loha", "linear_dim": 4, "linear_alpha": 3.0, "use_tucker": True},
    # fc1: full w1 ⊗ low-rank w2; conv: full w1 ⊗ full 4-D w2, scale 1 whatever the alpha
    "lokr-full-w1": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 2.0, "factor": 4},
    # fc1: both sides low-rank; conv: full w1 ⊗ low-rank w2 with the kernel flattened into lokr_w2_b
    "lokr-both": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1.5, "decompose_both": True},
    # conv: full w1 ⊗ Tucker w2 (lokr_t2)
    "lokr-tucker": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 2.0, "conv_dim": 1, "conv_alpha": 3.0,
                    "factor": 4, "use_tucker": True},
}  # fmt: skip


class Net(torch.nn.Module):
    """A Linear, a 3×3 Conv2d and a 1×1 Conv2d: what LyCORIS adapts in SD UNets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 48)
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.proj = torch.nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc1(x), self.proj(self.conv(y))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, 64, generator=g, dtype=torch.float64), torch.randn(
        2, 16, 6, 6, generator=g, dtype=torch.float64
    )


def _write(
    lycoris: Any, tmp_path: Path, config: str, dtype: torch.dtype | None = None, **extra: Any
) -> tuple[Path, Path, Any, Net]:
    """(base file, LyCORIS file, the network, the model): random non-zero weights (seeded), saved by
    LyCORIS' own `save_weights` (in `dtype`); the network and model are then float64, holding the
    values the file holds, for the reference."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = Net()
    base = tmp_path / "base.safetensors"
    save_tensors(base, {k: v.contiguous() for k, v in model.state_dict().items()}, {})
    args = CONFIGS[config] | extra
    net = lycoris.create_lycoris(model, 1.0, args.pop("linear_dim"), args.pop("linear_alpha"), preset="full", **args)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras:
            for name, p in lora.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if name == "dora_scale" else 0.2 * noise)
            if getattr(lora, "use_w1", False) and getattr(lora, "use_w2", False):
                lora.alpha.fill_(7.0)  # LyCORIS ignores the alpha of a full ⊗ full LoKr (scale 1)
    path = tmp_path / f"{config}.safetensors"
    net.save_weights(str(path), dtype, {"ss_network_module": "lycoris.kohya"})
    net.double()
    model.double()
    net.load_state_dict({k: v.double() for k, v in load_file(str(path)).items()})
    return base, path, net, model


def _reference(net: Any) -> dict[str, torch.Tensor]:
    """ΔW per module path as LyCORIS' forward pass applies it, float64."""
    with torch.no_grad():
        return {
            lora.lora_name.removeprefix("lycoris_"): lora.get_weight(lora.shape) * lora.scalar for lora in net.loras
        }


@pytest.fixture(scope="module")
def lycoris() -> Any:
    return oracle("lycoris", "lycoris-lora")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_delta_equals_lycoris(lycoris: Any, tmp_path: Path, config: str) -> None:
    """loractl's ΔW of every module is LyCORIS' own, and applying it changes the outputs as LyCORIS does."""
    base, path, net, model = _write(lycoris, tmp_path, config)
    adapter = load_adapter(path, options=ReadOptions(base=base))
    ref = _reference(net)
    assert set(adapter.modules) == set(ref) == {"fc1", "conv", "proj"}
    for name, delta in ref.items():
        assert rel(adapter.modules[name].delta_weight(torch.float64), delta) < 1e-6, name
    x, y = _inputs()
    with torch.no_grad():
        fc1, proj = model(x, y)  # LyCORIS applied
        net.restore()
        plain_fc1, plain_proj = model(x, y)
        d = {n: m.delta_weight(torch.float64) for n, m in adapter.modules.items()}
        conv = F.conv2d(y, model.conv.weight + d["conv"], model.conv.bias, padding=1)
        mine = F.conv2d(conv, model.proj.weight + d["proj"], model.proj.bias)
    assert rel(x @ d["fc1"].T, fc1 - plain_fc1) < 1e-6
    assert rel(mine - plain_proj, proj - plain_proj) < 1e-6


@pytest.mark.parametrize("config", ["loha", "lokr-both"])
def test_bfloat16_files(lycoris: Any, tmp_path: Path, config: str) -> None:
    """A file LyCORIS saved in bfloat16 (as trainers usually do): the factors are multiplied in float64."""
    base, path, net, _ = _write(lycoris, tmp_path, config, torch.bfloat16)
    adapter = load_adapter(path, options=ReadOptions(base=base))
    for name, delta in _reference(net).items():
        assert adapter.modules[name].A.dtype == torch.float32
        assert rel(adapter.modules[name].delta_weight(torch.float64), delta) < 1e-6, name


@pytest.mark.parametrize("config", ["loha", "lokr-full-w1"])
def test_dora_merge_equals_lycoris_forward(lycoris: Any, tmp_path: Path, config: str) -> None:
    """LoHa/LoKr with DoRA (`dora_wd`, LyCORIS' per-output-row `dora_scale`): `loractl merge` gives the outputs
    of LyCORIS' forward pass."""
    base, path, net, model = _write(lycoris, tmp_path, config, dora_wd=True)
    x, y = _inputs()
    with torch.no_grad():
        fc1, proj = model(x, y)
        net.restore()
        plain_fc1, plain_proj = model(x, y)
    code, _, err = run_cli("merge", base, path, "-o", tmp_path / "merged", "--dtype", "float32")
    assert code == 0, err
    with Checkpoint(tmp_path / "merged") as merged:
        w = {n: merged.get(f"{n}.weight").double() for n in ("fc1", "conv", "proj")}
    with torch.no_grad():
        mine_fc1 = F.linear(x, w["fc1"], model.fc1.bias)
        mine = F.conv2d(F.conv2d(y, w["conv"], model.conv.bias, padding=1), w["proj"], model.proj.bias)
    assert rel(mine_fc1 - plain_fc1, fc1 - plain_fc1) < 1e-5
    assert rel(mine - plain_proj, proj - plain_proj) < 1e-5


@pytest.mark.parametrize("config", ["loha", "lokr-full-w1"])
def test_peft_runs_the_full_rank_conversion(lycoris: Any, tmp_path: Path, config: str) -> None:
    """`convert --to peft` without --rank is exact: PEFT gives LyCORIS' outputs."""
    from peft import PeftModel

    base, path, net, model = _write(lycoris, tmp_path, config)
    x, y = _inputs()
    with torch.no_grad():
        expected = model(x, y)
    net.restore()
    code, out, err = run_cli("convert", path, "-o", tmp_path / "peft", "--to", "peft", "--base", base, "--json")
    assert code == 0, err
    assert json.loads(out)["lost"] == []
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "peft")).double()
    with torch.no_grad():
        got = peft_model(x, y)
    for a, b in zip(got, expected, strict=True):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("config", ["loha", "loha-tucker", "lokr-both"])
def test_truncation_error_is_the_svd_tail(lycoris: Any, tmp_path: Path, config: str) -> None:
    """--rank k: each module's reported error is the dense float64 SVD tail, the written ΔW the best rank-k one;
    refused without --allow-loss, nothing written."""
    base, path, net, _ = _write(lycoris, tmp_path, config)
    ref = _reference(net)
    k = 3
    with pytest.raises(AdapterError, match="rank truncation"):
        convert(path, tmp_path / "refused", to="peft", read_options=ReadOptions(base=base), rank=RankRule(rank=k))
    assert not (tmp_path / "refused").exists()
    report = convert(
        path, tmp_path / "out", to="peft", read_options=ReadOptions(base=base), rank=RankRule(rank=k), allow_loss=True
    )
    written = load_adapter(tmp_path / "out")
    for change in report.truncated:
        delta = ref[change.module].flatten(1)
        s = torch.linalg.svdvals(delta)
        tail = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        assert change.rank_out == k
        assert abs(change.rel_error - tail) <= 1e-6 * max(tail, 1e-3), change.module
        got = written.modules[change.module].delta_weight(torch.float64).flatten(1)
        assert rel(got, delta) == pytest.approx(tail, rel=1e-5, abs=1e-6)
    assert [x.what for x in report.lost] == ["rank truncation"]


def test_energy_rule(lycoris: Any, tmp_path: Path) -> None:
    """--energy E keeps, per module, the smallest rank whose σ² reach E of ‖ΔW‖²."""
    base, path, net, _ = _write(lycoris, tmp_path, "loha")
    ref = _reference(net)
    report = convert(
        path,
        tmp_path / "out",
        to="peft",
        read_options=ReadOptions(base=base),
        rank=RankRule(energy=0.9),
        allow_loss=True,
    )
    for change in report.truncated:
        s2 = torch.linalg.svdvals(ref[change.module].flatten(1)).square()
        share = torch.cumsum(s2, 0) / s2.sum()
        assert change.rank_out == int((share < 0.9 - 1e-12).sum()) + 1


@pytest.mark.parametrize("config", ["loha", "lokr-tucker"])
def test_merge_equals_base_plus_lycoris_delta(lycoris: Any, tmp_path: Path, config: str) -> None:
    """`loractl merge` writes W + ΔW (LyCORIS' ΔW) in float32, to float32 rounding."""
    base, path, net, _ = _write(lycoris, tmp_path, config)
    ref = _reference(net)
    code, _, err = run_cli("merge", base, path, "-o", tmp_path / "merged")
    assert code == 0, err
    with Checkpoint(tmp_path / "merged") as merged, Checkpoint(base) as original:
        for name, delta in ref.items():
            want = original.get(f"{name}.weight").double() + delta
            got = merged.get(f"{name}.weight").double()
            assert rel(got - original.get(f"{name}.weight").double(), delta) < 1e-5, name  # float32 W' rounding
            assert rel(got, want) < 2e-7, name
        assert torch.equal(merged.get("fc1.bias"), original.get("fc1.bias"))


def test_inspect_shows_algorithm_and_dimensions(lycoris: Any, tmp_path: Path) -> None:
    """inspect --json: the algorithm and each side's shape and rank (None: full), and the exact LoRA rank."""
    base, path, _, _ = _write(lycoris, tmp_path, "lokr-full-w1")
    code, out, err = run_cli("inspect", path, "--base", base, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["algorithms"] == ["LoKr"]
    fc1 = doc["lycoris"]["fc1"]
    assert fc1["w1"] == {"shape": [4, 4], "rank": None, "tucker": False}
    assert fc1["w2"] == {"shape": [12, 16], "rank": 4, "tucker": False}
    assert fc1["exact_rank"] == 16  # 4 (full 4×4) · 4
    assert doc["lycoris"]["conv"]["kernel"] == [3, 3]
    code, text, _ = run_cli("inspect", path, "--base", base)
    assert "LoKr (4×4 full) ⊗ (12×16 r4)" in text


def test_flattened_conv_kernel_needs_the_base(tmp_path: Path) -> None:
    """A LoHa conv stores its kernel flattened: without --base a module named like a conv is refused, naming it."""
    g = torch.Generator().manual_seed(3)
    t = {
        f"lora_unet_down_blocks_0_resnets_0_conv1.{k}": torch.randn(*s, generator=g)
        for k, s in {"hada_w1_a": (8, 2), "hada_w1_b": (2, 36), "hada_w2_a": (8, 2), "hada_w2_b": (2, 36)}.items()
    }
    path = tmp_path / "loha.safetensors"
    save_tensors(path, t | {"lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0)}, {})
    code, _, err = run_cli("convert", path, "-o", tmp_path / "out", "--to", "peft")
    assert code != 0
    assert "kernel flattened" in err and "--base" in err
    assert not (tmp_path / "out").exists()
