"""Merge and extract for Flux.1 transformers in both base layouts, judged by diffusers (issue 25 item 3).

A tiny `FluxTransformer2DModel` (random weights, no download) is the base as diffusers saves it (one file, or
sharded with an index, or inside a pipeline directory) and as the original single file (BFL's names, with
ComfyUI's `model.diffusion_model.` prefix or bare), built here by a hand-written inverse of diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` and checked against it. Every adapter layout (kohya
fused, diffusers split, original) merged into every base must give, loaded back the way diffusers loads
that base (`from_pretrained`, or the single-file converter), the outputs of loractl's ΔW added by hand
(1e-6 relative). diffusers' converter hardcodes Flux.1's real single-block widths (`linear1` split as
3072 ×3 + 12288): the tests run it with that split scaled to the tiny width (same order, same ratios).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import add_delta_by_hand, random_module
from oracles import oracle

from loractl.adapter import Adapter
from loractl.bases import detect_base
from loractl.formats import in_layout, load_adapter, save_adapter
from loractl.io.safetensors_writer import save_tensors

pytestmark = pytest.mark.interop
H = 32  # 2 heads of 16


@pytest.fixture(scope="module")
def diffusers() -> Any:
    return oracle("diffusers", "diffusers")


def _model(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def _run(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 6, 4, generator=g), "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
        "pooled_projections": torch.randn(1, 20, generator=g), "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]), "img_ids": torch.randn(6, 3, generator=g), "txt_ids": torch.zeros(5, 3),
    }  # fmt: skip
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _swap(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2)
    return torch.cat([scale, shift])


def _original_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's names from diffusers' (the inverse of diffusers' converter, written from BFL's `flux/model.py`)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    }  # fmt: skip
    double = {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    }  # fmt: skip
    for leaf in ("weight", "bias"):
        for d, o in simple.items():
            out[f"{o}.{leaf}"] = sd[f"{d}.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
        for i in range(2):
            b = f"transformer_blocks.{i}."
            for d, o in double.items():
                out[f"double_blocks.{i}.{o}.{leaf}"] = sd[f"{b}{d}.{leaf}"]
            out[f"double_blocks.{i}.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{b}attn.to_{p}.{leaf}"] for p in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{b}attn.add_{p}_proj.{leaf}"] for p in "qkv"]
            )
            s = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{leaf}"] = torch.cat(
                [sd[f"{s}attn.to_{p}.{leaf}"] for p in "qkv"] + [sd[f"{s}proj_mlp.{leaf}"]]
            )
            out[f"single_blocks.{i}.linear2.{leaf}"] = sd[f"{s}proj_out.{leaf}"]
            out[f"single_blocks.{i}.modulation.lin.{leaf}"] = sd[f"{s}norm.linear.{leaf}"]
    for i in range(2):
        for stream, attn in (("img", "attn.norm_"), ("txt", "attn.norm_added_")):
            for o, d in (("query", "q"), ("key", "k")):
                out[f"double_blocks.{i}.{stream}_attn.norm.{o}_norm.scale"] = sd[
                    f"transformer_blocks.{i}.{attn}{d}.weight"
                ]
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    return out


@contextmanager
def _tiny_widths() -> Any:
    """diffusers' Flux converter with its hardcoded single-block split (3072 ×3 + 12288) scaled to the tensor."""
    from diffusers.loaders import single_file_utils

    real = single_file_utils.torch

    class Scaled:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def split(t: torch.Tensor, sizes: Any, dim: int = 0) -> Any:
            if isinstance(sizes, tuple) and sum(sizes) != t.shape[dim]:
                unit = t.shape[dim] // (sum(sizes) // sizes[0])
                sizes = tuple(unit * s // sizes[0] for s in sizes)
            return real.split(t, sizes, dim=dim)

    single_file_utils.torch = Scaled()  # type: ignore[assignment]
    try:
        yield single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    finally:
        single_file_utils.torch = real


def _from_original(diffusers: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model diffusers' single-file conversion makes of an original state dict (ComfyUI prefix or not)."""
    with _tiny_widths() as convert:
        converted = convert(dict(state))
    model = _model(diffusers)
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def bases(diffusers: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-bases")
    model = _model(diffusers)
    model.save_pretrained(root / "dir")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    (root / "pipe").mkdir()
    model.save_pretrained(root / "pipe" / "transformer")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "pipe" / "vae").mkdir()
    (root / "pipe" / "vae" / "config.json").write_text("{}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = _original_state(sd)
    with _tiny_widths() as convert:  # the inverse above is diffusers' own map, read backwards
        back = convert(dict(original))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    save_tensors(root / "flux1-tiny.safetensors", original)
    save_tensors(root / "comfy.safetensors", {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in original.items()}
                 | {"vae.decoder.conv_in.weight": torch.ones(2, 2)})  # fmt: skip
    return {p.name.removesuffix(".safetensors"): p for p in root.iterdir() if p.name != "vae"}


def _adapter() -> Adapter:
    """Every Flux.1 linear module of the tiny model, in the original layout (fused q/k/v, linear1)."""
    widths: dict[str, tuple[int, int]] = {
        "img_in": (H, 4), "txt_in": (H, 24), "time_in.in_layer": (H, 256), "vector_in.out_layer": (H, H),
        "guidance_in.in_layer": (H, 256), "final_layer.linear": (4, H), "final_layer.adaLN_modulation.1": (2 * H, H),
    }  # fmt: skip
    for i in range(2):
        widths |= {
            f"double_blocks.{i}.img_attn.qkv": (3 * H, H), f"double_blocks.{i}.txt_attn.qkv": (3 * H, H),
            f"double_blocks.{i}.img_attn.proj": (H, H), f"double_blocks.{i}.img_mlp.0": (4 * H, H),
            f"double_blocks.{i}.txt_mlp.2": (H, 4 * H), f"double_blocks.{i}.img_mod.lin": (6 * H, H),
            f"single_blocks.{i}.linear1": (7 * H, H), f"single_blocks.{i}.linear2": (H, 5 * H),
            f"single_blocks.{i}.modulation.lin": (3 * H, H),
        }  # fmt: skip
    modules = {
        f"transformer.{name}": random_module(out, inp, 2 + i % 3, alpha=float(1 + i % 4), seed=i)
        for i, (name, (out, inp)) in enumerate(widths.items())
    }
    return Adapter(modules={n: replace(m, A=m.A * 0.05, B=m.B * 0.05) for n, m in modules.items()})


def _by_hand(diffusers: Any, adapter: Adapter, weight: float = 1.0) -> torch.Tensor:
    model = _model(diffusers)
    add_delta_by_hand(model, adapter, weight)
    return _run(model)


def _close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, tol: float = 1e-6) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert (got - want).norm() <= tol * want.norm(), float((got - want).norm() / want.norm())


def _load_merged(diffusers: Any, out: Path, kind: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    if out.is_dir():
        where = out / "transformer" if kind == "pipe" else out
        return diffusers.FluxTransformer2DModel.from_pretrained(where).eval()
    state = load_file(out)
    return _from_original(diffusers, {k: v for k, v in state.items() if not k.startswith("vae.")})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-adapters")
    adapter = _adapter()
    return {
        to: save_adapter(adapter, root / f"{to}.safetensors", format=to) for to in ("kohya", "diffusers", "original")
    }


def test_each_base_layout_is_detected(bases: dict[str, Path]) -> None:
    from loractl.bases import open_base

    assert {k: detect_base(p) for k, p in bases.items()} == dict.fromkeys(bases, "dit")
    kinds = {}
    for k, p in bases.items():
        base = open_base(p)
        kinds[k] = base.kind
        base.close()
    assert kinds == {"dir": "Flux.1 diffusers", "sharded": "Flux.1 diffusers", "pipe": "Flux.1 diffusers",
                     "flux1-tiny": "Flux.1 original", "comfy": "Flux.1 original"}  # fmt: skip


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "original"])
@pytest.mark.parametrize("kind", ["dir", "sharded", "pipe", "flux1-tiny"])
def test_merge_into_either_layout_runs_as_delta_by_hand(
    diffusers: Any, bases: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, layout: str, kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from loractl.bases.sd_single_file import RECORD_KEY
    from loractl.io.safetensors_header import read_header
    from loractl.ops.merge import merge

    monkeypatch.setenv("LORACTL_CACHE_DIR", str(tmp_path / "cache"))  # the fingerprint hashed beside the merge
    out = tmp_path / ("merged" if bases[kind].is_dir() else "merged.safetensors")
    report = merge(bases[kind], [adapters[layout]], out)
    adapter = load_adapter(adapters[layout])
    base = _run(_model(diffusers))
    _close(_run(_load_merged(diffusers, out, kind)), _by_hand(diffusers, adapter), base)
    assert report.fingerprints[0] is not None
    written = [out] if out.is_file() else sorted(out.rglob("*.safetensors"))
    records = [json.loads(read_header(f).metadata[RECORD_KEY]) for f in written]
    assert records and all(r["adapters"][0]["base_fingerprint"] == report.fingerprints[0] for r in records)
    rows = {m.module for m in report.modules}
    assert rows == set(adapter.modules)  # every module merged, one report
    if kind == "pipe":
        assert (out / "vae" / "config.json").is_file() and (out / "model_index.json").is_file()
    if kind == "sharded":
        assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_weight_and_comfyui_prefix_in_bf16(diffusers: Any, bases: dict[str, Path], adapters: dict[str, Path],
                                           tmp_path: Path) -> None:  # fmt: skip
    """A bf16 ComfyUI checkpoint (`model.diffusion_model.`, a VAE beside it): --weight, rounding reported, VAE kept."""
    from safetensors.torch import load_file

    from loractl.ops.merge import merge

    out = tmp_path / "comfy-merged.safetensors"
    report = merge(bases["comfy"], [adapters["diffusers"]], out, weights=[0.5])
    merged = load_file(out)
    assert torch.equal(merged["vae.decoder.conv_in.weight"], torch.ones(2, 2))
    assert merged["model.diffusion_model.img_in.weight"].dtype == torch.bfloat16
    base_state = load_file(bases["comfy"])
    bf16 = _from_original(diffusers, {k: v for k, v in base_state.items() if not k.startswith("vae.")})
    base = _run(bf16)
    # what was stored is W + 0.5·ΔW rounded once to bf16: within bf16's step of the exact sum
    want = _by_hand_on(bf16, load_adapter(adapters["diffusers"]), 0.5)
    _close(_run(_load_merged(diffusers, out, "comfy")), want, base, tol=2e-2)
    losses = {m.tensor: m.rounding_loss for m in report.modules}
    assert all(m.stored_type == "BF16" for m in report.modules)
    assert all(loss is not None and 0 < loss < 1 for loss in losses.values()), losses  # bf16 keeps most of ΔW
    meta = json.loads(_metadata(out)["loractl_merge"])
    assert meta["layout"] == "Flux.1 original" and meta["adapters"][0]["weight"] == 0.5


def _by_hand_on(model: torch.nn.Module, adapter: Adapter, weight: float) -> torch.Tensor:
    add_delta_by_hand(model, adapter, weight)
    return _run(model)


def _metadata(path: Path) -> dict[str, str]:
    from loractl.io.safetensors_header import read_header

    return read_header(path).metadata


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
@pytest.mark.parametrize("pair", [("dir", "dir"), ("flux1-tiny", "flux1-tiny"), ("flux1-tiny", "dir")])
def test_extract_from_either_layout_gives_the_delta(
    diffusers: Any, bases: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, pair: tuple[str, str], to: str
) -> None:
    """A fine-tune made by merging; extracted at the adapter's ranks (4 at most) in the chosen layout, it is the merged ΔW again."""
    from loractl.ops.extract import extract
    from loractl.ops.extract_factor import ExtractConfig
    from loractl.ops.merge import merge

    base_kind, ft_kind = pair
    ft = tmp_path / ("ft" if bases[ft_kind].is_dir() else "ft.safetensors")
    merge(bases[ft_kind], [adapters["kohya"]], ft)
    out = tmp_path / f"extracted-{to}.safetensors"
    extract(bases[base_kind], ft, out, ExtractConfig(rank=4), format=to)
    got = load_adapter(out)
    names = set(got.modules)
    assert any("double_blocks" in n for n in names) == (to == "kohya")
    base = _run(_model(diffusers))
    _close(_by_hand(diffusers, got), _by_hand(diffusers, load_adapter(adapters["kohya"])), base, tol=1e-5)
    # the extracted adapter records its base (in diffusers' terms): merging it back into that base checks it
    from loractl.formats import describe_adapter
    from loractl.ops.merge import merge as merge_again
    from loractl.ops.merge_shared import recorded_fingerprint

    assert recorded_fingerprint(describe_adapter(out))
    report = merge_again(bases[base_kind], [out], tmp_path / ("again" if bases[base_kind].is_dir() else "again.sft"))
    assert not report.base_notes
    if pair == ("flux1-tiny", "dir"):  # the fine-tune is another base: refused, nothing written
        from loractl.errors import IntegrityError

        with pytest.raises(IntegrityError, match="made for another base"):
            merge_again(ft, [out], tmp_path / "wrong")
        assert not (tmp_path / "wrong").exists()


def test_a_text_encoder_module_is_named_not_merged(bases: dict[str, Path], tmp_path: Path) -> None:
    from loractl.ops.merge_plan import plan_merge

    adapter = Adapter(modules={"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": random_module(8, 8, 2),
                               "transformer.double_blocks.0.img_attn.qkv": random_module(3 * H, H, 2)})  # fmt: skip
    path = save_adapter(adapter, tmp_path / "te.safetensors", format="kohya")
    plan = plan_merge(bases["dir"], [path])
    assert [p.code for p in plan.problems] == ["not-in-base"]
    assert "text encoder" in plan.problems[0].message and "transformer only" in plan.problems[0].message


TINY = {
    "SD3Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,),
    ),
    "WanTransformer3DModel": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
    ),
    "QwenImageTransformer2DModel": dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ),
    "LTXVideoTransformer3DModel": dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=16,
    ),
    "ZImageTransformer2DModel": dict(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
        axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    ),
}  # fmt: skip


def _rule_adapter(arch: Any, state: dict[str, torch.Tensor]) -> Adapter:
    """A module for every rule whose diffusers weights the model has, in the original layout (fused where the
    rule fuses); every 2-D block weight in diffusers' names for an architecture with one layout, and those its own
    checkpoint names otherwise."""
    shapes = {
        k.removesuffix(".weight"): tuple(v.shape) for k, v in state.items() if k.endswith(".weight") and v.ndim == 2
    }
    found: dict[str, tuple[int, int]] = {}
    if not arch.rules:  # and the modules the model's own checkpoint names otherwise (LTX-Video's `proj_in`, …)
        found = {n: s for n, s in shapes.items() if "blocks." in n or "layers." in n or arch.renamed_in_checkpoint(n)}
    for rule in arch.rules:
        for index in sorted(
            {n.split(".")[1] for n in shapes if n.split(".")[1:2] and n.split(".")[1].isdigit()} | {""}
        ):
            parts = [shapes.get(p) for p in rule.diffusers_names(index)]
            if all(parts) and ("{}" in rule.original) == bool(index):
                found[rule.original_name(index)] = (sum(p[0] for p in parts), parts[0][1])  # type: ignore[index]
    assert len(found) > 5, found
    modules = {
        f"transformer.{n}": random_module(out, inp, 2, alpha=3.0, seed=i)
        for i, (n, (out, inp)) in enumerate(found.items())
    }
    return Adapter(modules=modules)


@pytest.mark.parametrize("cls", list(TINY))
def test_other_transformers_merge_into_their_diffusers_directory(diffusers: Any, tmp_path: Path, cls: str) -> None:
    """SD3 (with SD3.5 Medium's second attention), Wan, Qwen-Image, LTX-Video, Z-Image: a kohya adapter in the
    original names (fused q/k/v) lands on diffusers' split tensors; the merged weights are W + ΔW by hand."""
    from safetensors.torch import load_file

    from loractl.bases import open_base
    from loractl.ops.merge import merge

    torch.manual_seed(0)
    getattr(diffusers, cls)(**TINY[cls]).save_pretrained(tmp_path / "base")
    base = open_base(tmp_path / "base")
    arch = base.found.arch  # type: ignore[attr-defined]
    base.close()
    state = load_file(tmp_path / "base" / "diffusion_pytorch_model.safetensors")
    adapter = _rule_adapter(arch, state)
    path = save_adapter(adapter, tmp_path / "lora.safetensors", format="kohya" if arch.rules else "diffusers")
    merge(tmp_path / "base", [path], tmp_path / "merged", weights=[0.75])
    merged = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    want = dict(state)
    for name, m in in_layout(load_adapter(path), "diffusers").modules.items():
        key = name.removeprefix("transformer.") + ".weight"
        want[key] = state[key] + 0.75 * m.delta_weight()
    assert set(merged) == set(state)
    for key, value in want.items():
        assert torch.allclose(merged[key], value, rtol=0, atol=1e-6), key


@pytest.mark.parametrize("kind", ["dir", "flux1-tiny"])
def test_merge_equals_diffusers_fuse_lora(
    diffusers: Any, bases: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """diffusers' own merge: `lora_state_dict` + `load_lora_adapter` + `fuse_lora` on the diffusers-layout file."""
    from diffusers.loaders import FluxLoraLoaderMixin

    from loractl.ops.merge import merge

    out = tmp_path / ("merged" if bases[kind].is_dir() else "merged.safetensors")
    merge(bases[kind], [adapters["diffusers"]], out, weights=[0.8])
    model = _model(diffusers)
    state, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(adapters["diffusers"]), return_alphas=True, return_lora_metadata=True
    )
    model.load_lora_adapter(state, prefix="transformer", network_alphas=alphas or None, metadata=metadata)
    model.fuse_lora(lora_scale=0.8)
    model.unload_lora()
    fused = {k: v for k, v in model.state_dict().items()}
    merged = _load_merged(diffusers, out, kind).state_dict()
    assert set(fused) == set(merged)
    base = _model(diffusers).state_dict()
    assert any(not torch.equal(base[k], fused[k]) for k in fused)
    for k in fused:
        assert torch.allclose(merged[k], fused[k], rtol=0, atol=1e-6), k
    _close(_run(_load_merged(diffusers, out, kind)), _run(model), _run(_model(diffusers)))


def _text_encoders(root: Path) -> None:
    """A tiny CLIP-L (`text_encoder/`) and T5 (`text_encoder_2/`) as transformers saves them, in a Flux pipeline."""
    import transformers

    torch.manual_seed(2)
    clip = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1)  # fmt: skip
    transformers.CLIPTextModel(clip).save_pretrained(root / "text_encoder")
    t5 = transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)
    transformers.T5EncoderModel(t5).save_pretrained(root / "text_encoder_2")


ENCODER_MODULES = {
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (16, 16),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": (32, 16),
    "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": (16, 16),
    "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wo": (16, 32),
}


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_pipeline_takes_text_encoder_modules_into_its_encoders(
    diffusers: Any, bases: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    """kohya's `lora_te1_…` (CLIP) and `lora_te3_…` (T5) modules beside the transformer's: merged into the
    pipeline's `text_encoder/` and `text_encoder_2/`, loaded back by transformers as W + w·ΔW by hand."""
    import shutil

    import transformers
    from safetensors.torch import load_file

    from loractl.ops.merge import merge

    pipe = tmp_path / "pipe"
    shutil.copytree(bases["pipe"], pipe)
    _text_encoders(pipe)
    # alpha = rank: diffusers keeps a diffusers file's alphas in metadata naming `text_model.…`, which transformers
    # 5's CLIP (saved without that prefix) does not have, so its text-encoder path is run without them
    modules = {n: random_module(o, i, 2, alpha=2.0, seed=k) for k, (n, (o, i)) in enumerate(ENCODER_MODULES.items())}
    adapter = Adapter(modules={**_adapter().modules, **modules})
    path = save_adapter(adapter, tmp_path / f"{layout}.safetensors", format=layout)
    report = merge(pipe, [path], tmp_path / "out", weights=[0.5])
    assert {m.module for m in report.modules} == set(load_adapter(path).modules)
    read = in_layout(load_adapter(path), "diffusers").modules
    for component, cls in (
        ("text_encoder", transformers.CLIPTextModel),
        ("text_encoder_2", transformers.T5EncoderModel),
    ):
        before = load_file(pipe / component / "model.safetensors")
        after = cls.from_pretrained(tmp_path / "out" / component).state_dict()
        hit = 0
        for key, value in before.items():  # CLIP saved by transformers 5 drops `text_model.`; the adapter has it
            names = [f"{component}.{p}{key.removesuffix('.weight')}" for p in ("", "text_model.")]
            module = next((n for n in names if n in read), None)
            want = value if module is None else value + 0.5 * read[module].delta_weight()
            hit += module is not None
            assert torch.allclose(after[key], want, rtol=0, atol=1e-6), key
        assert hit == 2
    if layout == "diffusers":  # diffusers' own reading of the text encoders' LoRA, run
        _encoders_match_diffusers(path, pipe, tmp_path / "out")
    base = _run(_model(diffusers))
    transformer_only = Adapter(modules={n: m for n, m in adapter.modules.items() if n.startswith("transformer.")})
    _close(_run(_load_merged(diffusers, tmp_path / "out", "pipe")), _by_hand(diffusers, transformer_only, 0.5), base)
    assert (tmp_path / "out" / "text_encoder" / "config.json").is_file()


def _encoders_match_diffusers(path: Path, pipe: Path, out: Path) -> None:
    """The merged CLIP gives the outputs of the base one with diffusers' `load_lora_into_text_encoder` (PEFT layers
    at lora_scale 0.5), what `FluxPipeline.load_lora_weights` does to it (diffusers takes no T5 LoRA for Flux)."""
    import transformers
    from diffusers.loaders import FluxLoraLoaderMixin

    state, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    ids = torch.tensor([[0, 5, 9, 17, 1]])
    for component, cls in (("text_encoder", transformers.CLIPTextModel),):  # Flux's pipeline loads no T5 LoRA
        theirs = cls.from_pretrained(pipe / component).eval()
        FluxLoraLoaderMixin.load_lora_into_text_encoder(
            state, alphas, text_encoder=theirs, prefix=component, lora_scale=0.5
        )
        with torch.no_grad():
            want, plain = theirs(ids).last_hidden_state, cls.from_pretrained(pipe / component)(ids).last_hidden_state
            got = cls.from_pretrained(out / component).eval()(ids).last_hidden_state
        assert (want - plain).abs().max() > 1e-4, component
        assert (got - want).norm() <= 1e-6 * want.norm(), (component, float((got - want).norm() / want.norm()))


def test_a_text_encoder_the_pipeline_lacks_is_refused_with_the_way(bases: dict[str, Path], tmp_path: Path) -> None:
    from loractl.ops.merge_plan import plan_merge

    adapter = Adapter(modules={"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": random_module(16, 16, 2),
                               "transformer.double_blocks.0.img_attn.qkv": random_module(3 * H, H, 2)})  # fmt: skip
    path = save_adapter(adapter, tmp_path / "te.safetensors", format="kohya")
    problems = plan_merge(bases["pipe"], [path]).problems  # a pipeline without text_encoder/
    assert [p.code for p in problems] == ["not-in-base"]
    assert "text_encoder/" in problems[0].message and problems[0].hint
    problems = plan_merge(bases["dir"], [path]).problems
    assert "whole pipeline directory" in (problems[0].hint or "")
