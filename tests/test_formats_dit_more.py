"""Flux.2 / HunyuanVideo names without a consumer, BFL's control LoRAs, and `inspect --plot` of a transformer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_module, run_cli, target_findings
from safetensors.torch import save_file

from loractl.adapter import Adapter
from loractl.errors import AdapterError
from loractl.formats import architecture, load_adapter, save_adapter
from loractl.ops.convert import convert

H = 16
NORMS = ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.key_norm.scale")


def _bfl_control(tmp_path: Path) -> Path:
    """BFL's control LoRA keys: bare BFL names, lora_A/lora_B (+ lora_B.bias), no alpha, and new qk-norm scales;
    `img_in` takes twice the latent channels (the control image's beside the noise's)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    shapes = {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.0.linear1": (7 * H, H), "img_in": (H, 8)}
    for name, (out, inp) in shapes.items():
        state[f"{name}.lora_A.weight"] = torch.randn(2, inp, generator=g)
        state[f"{name}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    state["double_blocks.0.img_attn.qkv.lora_B.bias"] = torch.randn(3 * H, generator=g)
    state |= {k: torch.randn(8, generator=g) for k in NORMS}
    save_file(state, tmp_path / "control.safetensors")
    return tmp_path / "control.safetensors"


def test_bfl_control_lora_keeps_its_norm_scales_as_full_tensors(tmp_path: Path) -> None:
    path = _bfl_control(tmp_path)
    adapter = load_adapter(path)
    assert adapter.meta.source_format == "original"
    assert sorted(adapter.full_tensors) == sorted(f"transformer.{k}" for k in NORMS)
    assert adapter.modules["transformer.double_blocks.0.img_attn.qkv"].bias is not None
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    assert architecture({n: m.in_features for n, m in adapter.modules.items()})["name"] == "Flux.1"
    # kohya names no full tensor (sd-scripts and ComfyUI name only weights so): refused, saying why; nothing written
    with pytest.raises(AdapterError, match="full tensors") as refused:
        convert(path, tmp_path / "as-kohya", to="kohya")
    assert "diffusers, original hold it all" in refused.value.hint and "ComfyUI" in refused.value.hint
    assert not (tmp_path / "as-kohya").exists()
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and "query_norm.scale" in out
    # diffusers loads the norm scales of such a file, but only of one with every block (this one has one of each)
    assert target_findings(path, "diffusers") == {"unknown-module": [None]}


def test_bfl_control_lora_converts_to_diffusers_and_back_exactly(tmp_path: Path) -> None:
    """diffusers' names for the norm scales (what load_lora_weights loads), split modules, lora biases; back in
    BFL's control layout: the original file's keys and tensors, bit for bit."""
    from safetensors.torch import load_file

    path = _bfl_control(tmp_path)
    report = convert(path, tmp_path / "d.safetensors", to="diffusers")
    assert report.verified and not report.lost
    written = load_file(tmp_path / "d.safetensors")
    assert torch.equal(written["transformer.transformer_blocks.0.attn.norm_q.weight"], load_file(path)[NORMS[0]])
    assert "transformer.single_transformer_blocks.0.attn.norm_k.weight" in written
    assert "transformer.transformer_blocks.0.attn.to_v.lora_B.bias" in written
    assert written["transformer.x_embedder.lora_A.weight"].shape == (2, 8)  # the widened input, as it was
    back = load_adapter(tmp_path / "d.safetensors")
    assert back.meta.source_format == "diffusers" and len(back.full_tensors) == 2
    convert(tmp_path / "d.safetensors", tmp_path / "o.safetensors", to="original")
    original, again = load_file(path), load_file(tmp_path / "o.safetensors")
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_lora_biases_without_norm_scales_write_fal_s_layout(tmp_path: Path) -> None:
    """A Flux adapter with lora biases but no norm scales: fal's Kontext names (`base_model.model.` + BFL's), which
    diffusers reads as fal's (not BFL's control layout, which it knows by the norms); a scale folded into B and bias."""
    from dataclasses import replace

    from safetensors.torch import load_file

    m = random_module(3 * H, H, 2, alpha=3.0, seed=4)
    biased = replace(m, bias=torch.randn(3 * H, generator=torch.Generator().manual_seed(5)))
    adapter = Adapter(modules={"transformer.double_blocks.0.img_attn.qkv": biased})
    path = save_adapter(adapter, tmp_path / "o.safetensors", format="original")
    assert sorted(load_file(path)) == [f"base_model.model.double_blocks.0.img_attn.qkv.{leaf}"
                                       for leaf in ("lora_A.weight", "lora_B.bias", "lora_B.weight")]  # fmt: skip
    back = load_adapter(path).modules["transformer.double_blocks.0.img_attn.qkv"]
    want = biased.delta_weight().double()
    assert back.scale == 1.0 and (back.delta_weight().double() - want).norm() <= 1e-6 * want.norm()
    assert (back.bias.double() - biased.bias.double() * biased.scale).norm() <= 1e-6 * biased.bias.norm()


def test_diffusers_writes_only_the_full_tensors_it_loads(tmp_path: Path) -> None:
    adapter = Adapter(
        modules={"transformer.transformer_blocks.0.attn.to_q": random_module(H, H, 2, seed=1)},
        full_tensors={"transformer.proj_out.weight": torch.ones(4, H)},
    )
    with pytest.raises(AdapterError, match=r"proj_out\.weight"):
        save_adapter(adapter, tmp_path / "d.safetensors", format="diffusers")
    assert not (tmp_path / "d.safetensors").exists()
    peft = save_adapter(adapter, tmp_path / "p", format="peft")
    report = convert(peft, tmp_path / "d.safetensors", to="diffusers", allow_loss=True)
    assert [x.what for x in report.lost] == ["full tensors"]
    assert not load_adapter(tmp_path / "d.safetensors").full_tensors


def test_flux2_kohya_names_read_back_and_fuse_exactly(tmp_path: Path) -> None:
    """sd-scripts' Flux.2 names (lora_unet_double_blocks_0_img_attn_qkv): the same fused modules as Flux.1's."""
    modules = {
        "transformer.double_blocks.0.img_attn.qkv": random_module(3 * H, H, 2, seed=1),
        "transformer.single_blocks.0.linear2": random_module(H, 4 * H, 3, seed=2),
        "transformer.single_blocks.0.linear1": random_module(9 * H, H, 2, seed=3),
    }
    path = save_adapter(Adapter(modules=modules), tmp_path / "k.safetensors", format="kohya")
    read = load_adapter(path)
    assert set(read.modules) == set(modules)
    convert(path, tmp_path / "d.safetensors", to="diffusers")
    back = load_adapter(tmp_path / "d.safetensors")
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in back.modules  # fused in diffusers too
    convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", to="kohya")
    again = load_adapter(tmp_path / "k2.safetensors")
    for name, m in modules.items():
        assert again.modules[name].rank == m.rank  # one A per module: nothing stacked
        assert torch.equal(again.modules[name].delta_weight(), m.delta_weight()), name


def test_inspect_plot_names_the_architecture(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from loractl.inspection import inspect_adapter
    from loractl.plots import inspection_title

    modules = {
        f"transformer.{kind}.{i}.{m}": random_module(out, inp, 2, seed=i)
        for kind, m, out, inp in (("double_blocks", "img_attn.qkv", 3 * H, H), ("single_blocks", "linear2", H, 4 * H))
        for i in range(2)
    }
    modules["transformer.single_stream_modulation.lin"] = random_module(3 * H, H, 2, seed=9)
    path = save_adapter(Adapter(modules=modules), tmp_path / "flux2.safetensors", format="kohya")
    title = inspection_title(inspect_adapter(path), chars=60)
    assert "Flux.2 transformer, original names" in title and "2 double blocks, 2 single blocks" in title.replace(
        "\n", " "
    )
    assert max(len(line) for line in title.splitlines()[1:]) <= 60
    png = tmp_path / "flux2.png"
    code, _, err = run_cli("inspect", path, "--plot", png)
    assert code == 0 and png.stat().st_size > 1000, err


def _bare_kohya(tmp_path: Path, names: dict[str, tuple[int, int]]) -> tuple[Path, set[str]]:
    """A kohya file as sd-scripts / musubi-tuner write it: without loractl's record of the module paths."""
    from safetensors.torch import load_file

    modules = {
        f"transformer.{n}": random_module(out, inp, 2, seed=i) for i, (n, (out, inp)) in enumerate(names.items())
    }
    written = save_adapter(Adapter(modules=modules), tmp_path / "loractl.safetensors", format="kohya")
    save_file(load_file(written), tmp_path / "bare.safetensors")
    return tmp_path / "bare.safetensors", set(modules)


def test_sd_scripts_flux2_names_resolve_without_a_record(tmp_path: Path) -> None:
    names = {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.3.linear2": (H, 4 * H),
             "double_stream_modulation_img.lin": (6 * H, H), "single_stream_modulation.lin": (3 * H, H),
             "guidance_in.out_layer": (H, H), "final_layer.adaLN_modulation.1": (2 * H, H)}  # fmt: skip
    path, modules = _bare_kohya(tmp_path, names)
    assert set(load_adapter(path).modules) == modules


def test_musubi_hunyuan_video_names_resolve_without_a_record(tmp_path: Path) -> None:
    """`lora_unet_double_blocks_0_img_attn_qkv` is Flux.1's `img_attn.qkv` by the vocabulary; in a HunyuanVideo file
    (its `img_mlp.fc1`, `txt_mod.linear`, text refiner) it is HunyuanVideo's `img_attn_qkv`."""
    refiner = "txt_in.individual_token_refiner.blocks.0"
    names = {"double_blocks.0.img_attn_qkv": (3 * H, H), "double_blocks.0.txt_attn_proj": (H, H),
             "double_blocks.0.img_mlp.fc1": (4 * H, H), "double_blocks.0.txt_mod.linear": (6 * H, H),
             "single_blocks.1.linear1": (7 * H, H), f"{refiner}.self_attn_qkv": (3 * H, H),
             "txt_in.c_embedder.linear_1": (H, H), "txt_in.input_embedder": (H, 8)}  # fmt: skip
    path, modules = _bare_kohya(tmp_path, names)
    read = load_adapter(path)
    assert set(read.modules) == modules
    assert architecture({n: m.in_features for n, m in read.modules.items()})["name"] == "HunyuanVideo"


def test_hunyuan_video_is_told_from_flux1_by_its_names_not_its_block_count() -> None:
    """Within Flux.1's 19 double / 38 single blocks: HunyuanVideo's own names (`x_embedder.proj`, its Conv3d patch
    embedder; `img_in.proj`; `img_mlp.fc1`) say HunyuanVideo; Flux.1's `x_embedder` says Flux.1; the shared block
    names alone say both, and inspect's line names both."""
    from loractl.inspection import architecture_line

    w = 3072
    hunyuan = {
        "diffusers": {"transformer.transformer_blocks.0.attn.to_q": w, "transformer.x_embedder.proj": 16},
        "original": {"transformer.single_blocks.0.linear1": w, "transformer.img_in.proj": 16},
        "kohya-read": {"transformer.double_blocks.0.img_attn.qkv": w, "transformer.double_blocks.0.img_mlp.fc1": w},
    }
    for what, modules in hunyuan.items():
        found = architecture(modules)
        assert found is not None and (found["name"], found["alike"]) == ("HunyuanVideo", []), what
    flux = architecture({"transformer.transformer_blocks.0.attn.to_q": w, "transformer.x_embedder": 64})
    assert flux is not None and (flux["name"], flux["alike"]) == ("Flux.1", [])
    shared = {
        "diffusers": {"transformer.transformer_blocks.18.attn.to_q": w, "transformer.single_transformer_blocks.37.proj_mlp": w,
                      "transformer.time_text_embed.guidance_embedder.linear_1": 256},
        "original": {"transformer.single_blocks.0.linear1": w, "transformer.final_layer.linear": w},
    }  # fmt: skip
    for what, modules in shared.items():
        found = architecture(modules)
        assert found is not None and (found["name"], found["alike"]) == ("Flux.1", ["HunyuanVideo"]), what
        assert architecture_line(found).startswith("Flux.1 or HunyuanVideo transformer"), what
    beyond = architecture({"transformer.transformer_blocks.19.attn.to_q": w})  # Flux.1 has 19 double blocks
    assert beyond is not None and beyond["name"] == "HunyuanVideo"
    # kohya's `img_attn_qkv` is either's; read from a diffusion_model. file, `img_attn.qkv` is Flux.1's only
    qkv = {"transformer.double_blocks.0.img_attn.qkv": w}
    assert architecture(qkv, kohya=True)["alike"] == ["HunyuanVideo"]  # type: ignore[index]
    assert architecture(qkv)["alike"] == []  # type: ignore[index]


def test_a_wan_adapter_of_the_ffns_only_keeps_its_layout(tmp_path: Path) -> None:
    """diffusers' `blocks.0.ffn.net.0.proj` is not Wan's original `blocks.0.ffn.0`: each is read in its layout and
    converts to the other's names."""
    diffusers_names = {"transformer.blocks.0.ffn.net.0.proj": (4 * H, H), "transformer.blocks.1.ffn.net.2": (H, 4 * H)}
    original_names = {"transformer.blocks.0.ffn.0": (4 * H, H), "transformer.blocks.1.ffn.2": (H, 4 * H)}
    for names, layout in ((diffusers_names, "diffusers"), (original_names, "original")):
        found = architecture({n: inp for n, (_, inp) in names.items()})
        assert found is not None and (found["name"], found["layout"]) == ("Wan", layout)
    adapter = Adapter(
        modules={n: random_module(o, i, 2, seed=k) for k, (n, (o, i)) in enumerate(diffusers_names.items())}
    )
    path = save_adapter(adapter, tmp_path / "ffn.safetensors", format="diffusers")
    convert(path, tmp_path / "original.safetensors", to="original")
    back = load_adapter(tmp_path / "original.safetensors")
    assert set(back.modules) == set(original_names)
    for (name, m), theirs in zip(adapter.modules.items(), original_names, strict=True):
        assert torch.allclose(back.modules[theirs].delta_weight(), m.delta_weight(), rtol=0, atol=1e-6), name
