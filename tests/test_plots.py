"""`inspect --plot` and `extract --plot`: the layout, the recorded spectra, and the pictures written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run

from loractl.plots import SpectrumRecorder, grid

mpimg = pytest.importorskip("matplotlib.image")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def assert_picture(path: Path, min_size: tuple[int, int]) -> None:
    """A PNG at least `min_size` (width, height) pixels, with drawn content: many colours, not one flat field."""
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (width, height)
    rgb = (image[..., :3] * 255).round().reshape(-1, 3)
    colours = {tuple(p) for p in rgb[:: max(1, len(rgb) // 20000)].tolist()}
    assert len(colours) > 50, len(colours)
    background = (rgb == 255).all(axis=1).mean()
    assert 0.2 < background < 0.97, background  # neither blank nor a solid block


def test_grid_places_layers_in_rows_and_module_types_in_columns() -> None:
    names = [f"model.layers.{i}.{t}" for i in (10, 2, 0) for t in ("self_attn.q_proj", "mlp.up_proj")]
    layout = grid([*names, "lm_head"])
    assert layout.rows == ("-", "0", "2", "10")  # numeric order, not text order
    assert layout.columns == ("lm_head", "mlp.up_proj", "self_attn.q_proj")
    assert layout.cells["model.layers.10.mlp.up_proj"] == (3, 1)
    assert layout.cells["lm_head"] == (0, 0)


def test_grid_lays_out_a_unet_by_its_blocks() -> None:
    """Down, mid and up blocks get their own rows in the model's order; no two modules share a cell."""
    block = "attentions.{a}.transformer_blocks.0.attn1.{p}"
    names = [
        f"unet.{stage}.{b}.{block.format(a=a, p=p)}"
        for stage, numbers in (("up_blocks", (3, 1)), ("down_blocks", (2, 0)))
        for b in numbers
        for a in range(2)
        for p in ("to_q", "to_out.0")
    ] + ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    layout = grid(names)
    assert layout.rows == (
        *(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in (0, 2) for a in range(2)),
        "mid_block.attentions.0.transformer_blocks.0",
        *(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in (1, 3) for a in range(2)),
    )
    assert layout.columns == ("attn1.to_out.0", "attn1.to_q")  # the fused index kept, never a placeholder
    assert len(set(layout.cells.values())) == len(names)
    flux = grid(
        [f"transformer.{s}.{i}.attn.to_q" for s in ("transformer_blocks", "single_transformer_blocks") for i in (0, 1)]
    )
    assert len(set(flux.rows)) == 4 and flux.rows[0] == "transformer_blocks.0"  # two stacks, never one row


def test_inspect_plot_of_a_one_rank_adapter_has_no_constant_rank_panel(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from helpers import random_module

    import loractl
    from loractl.adapter import Adapter, AdapterMeta

    modules = {
        f"unet.{s}.{b}.attentions.0.transformer_blocks.0.attn1.{p}": random_module(16, 16, 4, seed=7 * b + j)
        for s in ("down_blocks", "up_blocks")
        for b in range(3)
        for j, p in enumerate(("to_q", "to_k", "to_v", "to_out.0"))
    }
    loractl.save_adapter(Adapter(modules=modules, meta=AdapterMeta(base_model="sd")), tmp_path / "sd")
    png = tmp_path / "sd.png"
    code, _, err = run(capsys, "inspect", str(tmp_path / "sd"), "--plot", str(png))
    assert code == 0, err
    assert_picture(png, (400, 300))
    one_panel = mpimg.imread(png)
    modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = random_module(16, 16, 2, seed=99)
    loractl.save_adapter(Adapter(modules=modules, meta=AdapterMeta(base_model="sd")), tmp_path / "sd2")
    code, _, err = run(capsys, "inspect", str(tmp_path / "sd2"), "--plot", str(png))
    assert code == 0, err
    two_panels = mpimg.imread(png)
    assert one_panel.shape[0] == two_panels.shape[0] and two_panels.shape[1] > 1.7 * one_panel.shape[1]


def test_inspect_plot_writes_a_heatmap(capsys: pytest.CaptureFixture[str], fixtures_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "layers.png"
    code, out, err = run(capsys, "inspect", str(fixtures_dir / "adapters" / "tiny-patterns"), "--plot", str(png))
    assert code == 0, err
    assert "‖ΔW‖" in out  # --plot implies --stats: the table shows the norms it drew
    assert f"plot: {png}" in err.splitlines()  # says where it wrote
    assert_picture(png, (800, 250))
    image = mpimg.imread(png)
    assert image.shape[1] > 2 * image.shape[0]  # two side-by-side panels, 7 module types by 2 layers


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with tiny-qv merged in: a fine-tune whose ΔW is known exactly."""
    from loractl.ops.merge import merge

    out = tmp_path_factory.mktemp("ft") / "ft"
    merge(FIXTURES / "tiny-llama", [FIXTURES / "adapters" / "tiny-qv"], out)
    return out


def test_recorder_sees_each_delta_and_its_spectrum(fixtures_dir: Path, finetuned: Path, tmp_path: Path) -> None:
    from loractl import load_adapter
    from loractl.ops.extract import ExtractConfig, extract

    adapter_dir = fixtures_dir / "adapters" / "tiny-qv"
    spectra = SpectrumRecorder()
    extract(fixtures_dir / "tiny-llama", finetuned, tmp_path / "lora", ExtractConfig(rank=2), observe=spectra.observe)
    adapter = load_adapter(adapter_dir)
    assert set(spectra.values) == set(adapter.modules)
    for name, m in adapter.modules.items():
        reference = torch.linalg.svdvals(m.delta_weight().double())  # the dense ΔW, independently
        got = torch.tensor(spectra.values[name], dtype=torch.float64)
        assert len(got) == min(m.delta_weight().shape)  # small matrices: the whole spectrum
        assert torch.allclose(got[: m.rank], reference[: m.rank], rtol=1e-3), name
        assert float(got[m.rank :].max()) < 1e-4 * float(got[0])  # a rank-r ΔW has r non-zero values


def test_extract_plot_writes_spectra(
    capsys: pytest.CaptureFixture[str], fixtures_dir: Path, finetuned: Path, tmp_path: Path
) -> None:
    png = tmp_path / "spectra.png"
    args = ["extract", str(fixtures_dir / "tiny-llama"), str(finetuned), "-o", str(tmp_path / "lora")]
    code, _, err = run(capsys, *args, "--energy", "0.9", "--plot", str(png))
    assert code == 0, err
    assert f"plot: {png}" in err.splitlines()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert_picture(png, (600, 250))


def test_plot_refuses_to_replace_an_input(
    capsys: pytest.CaptureFixture[str], fixtures_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    for f in (fixtures_dir / "adapters" / "tiny-qv").iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    before = (target / "adapter_model.safetensors").read_bytes()
    code, _, err = run(capsys, "inspect", str(target), "--plot", str(target / "adapter_model.safetensors"))
    assert code == 2 and "would overwrite the input" in err
    assert (target / "adapter_model.safetensors").read_bytes() == before


def test_plot_without_matplotlib_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str], fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    code, _, err = run(capsys, "inspect", str(fixtures_dir / "adapters" / "tiny-qv"), "--plot", str(tmp_path / "p.png"))
    assert code == 2
    assert err.splitlines() == [
        "error: --plot needs matplotlib, which is not installed",
        "hint: pip install 'loractl[plot]'",
    ]
    assert not (tmp_path / "p.png").exists()
