"""Single-file SD checkpoints: the name map against diffusers' conversion, merge against diffusers' own
LoRA fusing (merge into the single file, convert with diffusers == diffusers merging into its layout),
and extraction from two single files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_pipelines import TinySD, tiny_sd, to_diffusers, unet_to_ldm

from loractl import merge
from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.bases.sd_single_file import diffusers_names
from loractl.errors import IntegrityError, UsageError
from loractl.formats import load_adapter, save_adapter
from loractl.ops.extract import ExtractConfig, extract_adapter

pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def sd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinySD:
    return tiny_sd(request.param, tmp_path_factory.mktemp(request.param))


def _norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ≥ 5.6 CLIPTextModel has no `text_model.`: compare without it."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _components(sd: TinySD) -> dict[str, torch.nn.Module]:
    out = {"unet": sd.unet, "text_encoder": sd.text_encoders[0]}
    return out | ({"text_encoder_2": sd.text_encoders[1]} if sd.kind == "sdxl" else {})


def test_name_map_is_diffusers_conversion(sd: TinySD) -> None:
    state = load_file(sd.single_file)
    converted = to_diffusers(sd.kind, state)
    for component, model in _components(sd).items():  # the test's single file is the models, per diffusers
        got, want = _norm(converted[component]), _norm(model.state_dict())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), component
    names = diffusers_names({k: tuple(v.shape) for k, v in state.items()})
    expected = {f"{c}.{k}": v for c, conv in converted.items() for k, v in conv.items()}
    assert names.keys() == expected.keys()
    for key, src in names.items():
        t = state[src.key]
        t = t[src.rows[0] : src.rows[1]] if src.rows else t
        assert torch.equal(t.T if src.transposed else t, expected[key]), key
    assert any(s.rows for s in names.values()) == (sd.kind == "sdxl")  # OpenCLIP's fused q/k/v


def _lora(sd: TinySD, seed: int = 1) -> Adapter:
    """LoRA on UNet attention, feed-forward, a 3×3 resnet conv, proj_in, and q/k/v/fc1 of every text encoder."""
    g = torch.Generator().manual_seed(seed)
    weights = sd.unet.state_dict()
    block = "down_blocks.0.attentions.0" if sd.kind == "sd1" else "down_blocks.1.attentions.0"
    mods = {}
    leaves = [f"{block}.transformer_blocks.0.{x}" for x in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj")]
    for leaf in [*leaves, f"{block}.proj_in", "up_blocks.1.resnets.0.conv1"]:
        w = weights[f"{leaf}.weight"]
        a, b = torch.randn(4, *w.shape[1:], generator=g) * 0.3, torch.randn(w.shape[0], 4, *[1] * (w.ndim - 2)) * 0.3
        mods[f"unet.{leaf}"] = LoraModule(A=a, B=b, scale=0.5, alpha=2.0, kind="conv" if w.ndim == 4 else "linear")
    for te, model in list(_components(sd).items())[1:]:
        inner = "text_model." if hasattr(model, "text_model") else ""
        for leaf, out in (
            ("self_attn.q_proj", 16),
            ("self_attn.k_proj", 16),
            ("self_attn.v_proj", 16),
            ("mlp.fc1", 32),
        ):
            a, b = torch.randn(4, 16, generator=g) * 0.3, torch.randn(out, 4, generator=g) * 0.3
            mods[f"{te}.{inner}encoder.layers.1.{leaf}"] = LoraModule(A=a, B=b, scale=0.5, alpha=2.0)
    return Adapter(modules=mods, meta=AdapterMeta())


def _kohya_names(sd: TinySD, adapter: Adapter) -> Adapter:
    """As kohya files name them: `text_model.` always; SDXL UNet modules by their SGM (single-file) names."""
    out = {}
    for name, m in adapter.modules.items():
        name = name.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")
        if sd.kind == "sdxl" and name.startswith("unet."):
            sgm = unet_to_ldm({name[5:] + ".weight": m.A}, 2, tuple(sd.unet.config.up_block_types))
            name = "unet." + next(iter(sgm)).removeprefix("model.diffusion_model.").removesuffix(".weight")
        out[name] = m
    return Adapter(modules=out, meta=adapter.meta)


def _fused_by_diffusers(sd: TinySD, lora: Path) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers loading the LoRA into its own layout and fusing it: the reference."""
    import copy

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {k: copy.deepcopy(v) for k, v in _components(sd).items()}
    if sd.kind == "sd1":
        pipe = StableDiffusionPipeline(vae=None, tokenizer=None, scheduler=None, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)  # fmt: skip
    else:
        pipe = StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None, scheduler=None, **parts)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {c: _norm(getattr(pipe, c).state_dict()) for c in parts}


def test_merge_into_single_file_equals_diffusers_fusing(sd: TinySD, tmp_path: Path) -> None:
    adapter = _lora(sd)
    save_adapter(adapter, tmp_path / "diffusers.safetensors", format="diffusers")
    save_adapter(_kohya_names(sd, adapter), tmp_path / "kohya.safetensors", format="kohya")
    reference = _fused_by_diffusers(sd, tmp_path / "diffusers.safetensors")
    before = to_diffusers(sd.kind, load_file(sd.single_file))
    changed = {(c, k) for c in reference for k, v in reference[c].items() if not torch.equal(v, _norm(before[c])[k])}
    assert len(changed) == len(adapter.modules)  # diffusers' fusing changed one weight per module
    for source in ("diffusers", "kohya"):
        out = tmp_path / f"merged-{source}.safetensors"
        report = merge(sd.single_file, [tmp_path / f"{source}.safetensors"], out)
        assert len(report.modules) == len(adapter.modules)
        merged = to_diffusers(sd.kind, load_file(out))
        for component, want in reference.items():
            got = _norm(merged[component])
            for key, value in want.items():
                err = (got[key] - value).norm() / value.norm().clamp_min(1e-12)
                assert err <= 1e-6, (source, component, key, float(err))
        base, new = load_file(sd.single_file), load_file(out)
        merged_keys = {m.tensor for m in report.modules}
        assert all(torch.equal(base[k], new[k]) for k in base if k not in merged_keys)  # copied untouched
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        assert meta["modelspec.title"] == "tiny" and json.loads(meta["loractl_merge"])["layout"] == sd.kind


def test_half_precision_file_reports_rounding_loss(sd: TinySD, tmp_path: Path) -> None:
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(sd.single_file).items()}, half)
    adapter = _lora(sd)
    save_adapter(adapter, tmp_path / "lora.safetensors", format="diffusers")
    report = merge(half, [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    base, out = load_file(half), load_file(tmp_path / "out.safetensors")
    for m in report.modules:
        assert out[m.tensor].dtype == torch.float16 and m.stored_type == "F16"
        if len(report.plan.updates[m.tensor]) > 1:
            continue  # fused q/k/v: the loss is the tensor's, checked through the others
        delta = adapter.modules[m.module].delta_weight(torch.float64)
        exact = base[m.tensor].double() + delta.reshape(base[m.tensor].shape)
        loss = (out[m.tensor].double() - exact).norm() / delta.norm()
        assert m.rounding_loss == pytest.approx(float(loss), rel=1e-3), m.module
        assert 0 < m.rounding_loss < 0.05, (m.module, m.rounding_loss)
    assert any(not torch.equal(base[m.tensor], out[m.tensor]) for m in report.modules)


def test_extract_recovers_the_adapter(sd: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _lora(sd)
    save_adapter(adapter, tmp_path / "lora.safetensors", format="diffusers")
    finetuned = tmp_path / "ft.safetensors"
    merge(sd.single_file, [tmp_path / "lora.safetensors"], finetuned)
    code, out, err = run(capsys, "extract", str(sd.single_file), str(finetuned), "-o", str(tmp_path / "x.safetensors"),
                         "--rank", "4", "--targets", ".*", "--format", "kohya", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    got = load_adapter(tmp_path / "x.safetensors")
    want = {
        k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."): m for k, m in adapter.modules.items()
    }
    assert set(got.modules) == set(want), (sorted(got.modules), sorted(want))
    for name, m in want.items():
        expected = m.delta_weight(torch.float64)
        err_rel = (got.modules[name].delta_weight(torch.float64) - expected).norm() / expected.norm()
        assert err_rel < 1e-5, (name, float(err_rel))
    assert report["totals"]["modules"] == len(want)
    default = extract_adapter(sd.single_file, finetuned, ExtractConfig(rank=4))  # sd-scripts' default: no 3×3 convs
    assert set(default.adapter.modules) == set(want) - {"unet.up_blocks.1.resnets.0.conv1"}
    # named in diffusers' terms, as the adapter's modules are (was: the stored name, when SD had a loop of its own)
    assert [n.name for n in default.report.not_extracted()] == ["unet.up_blocks.1.resnets.0.conv1.weight"]


def test_extract_records_the_base_fingerprint_and_refuses_a_swapped_pair(sd: TinySD, tmp_path: Path) -> None:
    """One extract loop for every kind: an SD pair's adapter records its base's fingerprint, which merge checks
    (the base takes it, the fine-tune refuses it), and a merge given as BASE is named as a swap."""
    save_adapter(_lora(sd), tmp_path / "lora.safetensors", format="diffusers")
    finetuned = tmp_path / "ft.safetensors"
    merge(sd.single_file, [tmp_path / "lora.safetensors"], finetuned)
    extracted = extract_adapter(sd.single_file, finetuned, ExtractConfig(rank=4)).adapter
    assert extracted.meta.base_fingerprint and extracted.meta.base_views
    save_adapter(extracted, tmp_path / "x", format="peft")
    assert merge(sd.single_file, [tmp_path / "x"], tmp_path / "again.safetensors").fingerprints[0] == (
        extracted.meta.base_fingerprint
    )
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(finetuned, [tmp_path / "x"], tmp_path / "wrong.safetensors")
    with pytest.raises(UsageError, match="did you swap BASE and FINETUNED"):
        extract_adapter(finetuned, sd.single_file, ExtractConfig(rank=4))


def test_unknown_layouts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd3 = tmp_path / "unet-only.safetensors"  # (SD3's and Flux's files are diffusion transformer bases: test_merge_dit)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(6, 2, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(2, 6, 3, 3)}, sd3)  # fmt: skip
    lora = tmp_path / "lora.safetensors"
    save_adapter(Adapter(modules={"unet.conv_in": LoraModule(A=torch.ones(1, 2), B=torch.ones(2, 1), scale=1.0)},
                         meta=AdapterMeta()), lora, format="diffusers")  # fmt: skip
    code, _, err = run(capsys, "merge", str(sd3), str(lora), "-o", str(tmp_path / "out.safetensors"))
    assert code == 2 and "unknown layout" in err and "hint:" in err
    assert not (tmp_path / "out.safetensors").exists()


def _linear_only(adapter: Adapter) -> Adapter:
    return Adapter(modules={k: m for k, m in adapter.modules.items() if m.kind == "linear"}, meta=AdapterMeta())


def _pickled_peft(adapter: Adapter, root: Path) -> Path:
    save_adapter(adapter, root, format="peft")
    torch.save(load_file(root / "adapter_model.safetensors"), root / "adapter_model.bin")
    (root / "adapter_model.safetensors").unlink()
    return root


def _old_mlx_npz(adapter: Adapter, path: Path) -> Path:
    """mlx-examples' first format: factors as (in, r) and (r, out), no scale stored."""
    import numpy as np

    arrays = {f"{n}.lora_{x}": t.T.numpy() for n, m in adapter.modules.items() for x, t in (("a", m.A), ("b", m.B))}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["pickle", "loralib", "npz"])
def test_reading_options_reach_a_single_file_merge(
    case: str, sd: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--allow-pickle, --from, --alpha and --scale were dropped for single-file bases: each now makes the
    adapter readable, and the merge equals the merge of the same adapter as a diffusers file."""
    adapter = _linear_only(_lora(sd))
    save_adapter(adapter, tmp_path / "lora.safetensors", format="diffusers")
    merge(sd.single_file, [tmp_path / "lora.safetensors"], tmp_path / "want.safetensors")
    if case == "pickle":
        source, argv = _pickled_peft(adapter, tmp_path / "pickled"), ["--allow-pickle"]
    elif case == "loralib":
        source = save_adapter(adapter, tmp_path / "lora.bin", format="loralib")
        argv = ["--from", "loralib", "--allow-pickle", "--alpha", "2"]  # rank 4, scale 0.5
    else:
        source, argv = _old_mlx_npz(adapter, tmp_path / "adapters.npz"), ["--scale", "0.5"]
    out = tmp_path / "got.safetensors"
    code, _, err = run(capsys, "merge", str(sd.single_file), str(source), "-o", str(out))
    assert code != 0 and any(flag in err for flag in argv) and not out.exists()
    code, _, err = run(capsys, "merge", str(sd.single_file), str(source), "-o", str(out), *argv)
    assert code == 0, err
    got, want = load_file(out), load_file(tmp_path / "want.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_from_and_device_reach_a_single_file_merge(
    sd: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_adapter(_lora(sd), tmp_path / "lora.safetensors", format="diffusers")
    out, argv = tmp_path / "out.safetensors", ["merge", str(sd.single_file), str(tmp_path / "lora.safetensors")]
    code, _, err = run(capsys, *argv, "-o", str(out), "--from", "mlx")
    assert code != 0 and "error:" in err and not out.exists()
    code, _, err = run(capsys, *argv, "-o", str(out), "--device", "tpu")
    assert code == 2 and "tpu" in err and not out.exists()


def _diffusers_fingerprint(sd: TinySD, adapter: Adapter, tmp: Path) -> str:
    """The fingerprint of the adapter's weights in diffusers' own layout (the reference a record holds)."""
    from loractl.io.checkpoint import Checkpoint

    converted = {c: _norm(v) for c, v in to_diffusers(sd.kind, load_file(sd.single_file)).items()}
    state = {}
    for module in adapter.modules:
        component, _, rest = module.partition(".")
        state[f"{module}.weight"] = converted[component][rest.removeprefix("text_model.") + ".weight"].contiguous()
    (tmp / "ref").mkdir()
    save_file(state, tmp / "ref" / "model.safetensors")
    with Checkpoint(tmp / "ref") as ckpt:
        return ckpt.fingerprint(sorted(state))


def test_single_file_base_fingerprint_is_checked(
    sd: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from loractl.errors import IntegrityError

    adapter = _lora(sd)
    recorded = _diffusers_fingerprint(sd, adapter, tmp_path)
    save_adapter(replace(adapter, meta=AdapterMeta(base_fingerprint=recorded)), tmp_path / "mine.safetensors",
                 format="diffusers")  # fmt: skip
    other = replace(adapter, meta=AdapterMeta(base_fingerprint="sha256:" + "0" * 64))
    save_adapter(other, tmp_path / "theirs.safetensors", format="diffusers")
    report = merge(sd.single_file, [tmp_path / "mine.safetensors"], tmp_path / "a.safetensors")
    assert report.fingerprints == (recorded,) and report.base_notes == ()
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert json.loads(f.metadata()["loractl_merge"])["adapters"][0]["base_fingerprint"] == recorded
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(sd.single_file, [tmp_path / "theirs.safetensors"], tmp_path / "b.safetensors")
    code, _, err = run(capsys, "merge", str(sd.single_file), str(tmp_path / "theirs.safetensors"),
                       "-o", str(tmp_path / "b.safetensors"), "--allow-base-mismatch")  # fmt: skip
    assert code == 0 and "merged anyway" in err
