"""Merge into Flux.2, HunyuanVideo, SD3.5, Wan, Qwen-Image, LTX-Video and Z-Image transformers in every base layout,
judged by diffusers.

For each architecture a tiny diffusers transformer (small config, random weights, no download) is the base as
diffusers saves it (a model directory, or inside a pipeline directory) and as the original single file. The
original file is built by reading loractl's rule table backwards plus a short list of the tensors no LoRA rule
names (norms, embeddings), and is then proved by diffusers' own single-file converter
(`convert_flux2_transformer_checkpoint_to_diffusers`, `convert_hunyuan_video_transformer_to_diffusers`,
`convert_sd3_transformer_checkpoint_to_diffusers`, `convert_wan_transformer_to_diffusers`,
`convert_ltx_transformer_checkpoint_to_diffusers`, `convert_z_image_transformer_checkpoint_to_diffusers`: the
rules and LTX-Video's / Z-Image's checkpoint-only renames read backwards), which must give back
the model's state dict exactly. Qwen-Image has no converter: its original names are diffusers' (ComfyUI's file
only adds `model.diffusion_model.`). A merged base, loaded the way diffusers loads that layout (`from_pretrained`
or the converter), must hold W + w·ΔW by hand for an adapter in each layout (kohya fused, diffusers split,
original), and equal diffusers' `load_lora_adapter` + `fuse_lora` of the diffusers-layout file.
HunyuanVideo's converter hardcodes the real single-block width (3072); the tests run it scaled to the tiny width.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from oracles import oracle
from test_merge_dit import TINY, _rule_adapter

from loractl.formats import in_layout, load_adapter, save_adapter
from loractl.formats._dit import architectures
from loractl.io.safetensors_header import read_header
from loractl.io.safetensors_writer import save_tensors

pytestmark = pytest.mark.interop


@dataclass(frozen=True)
class Case:
    cls: str
    config: dict[str, Any]
    converter: str | None  # diffusers' single-file converter; None: the original names are diffusers'
    renames: tuple[tuple[str, str], ...]  # diffusers → original for the tensors no LoRA rule names
    prefix: str  # of the original file's names (ComfyUI's, or bare)
    mixin: str  # diffusers' LoRA loader


_FLUX_NORMS = (
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
)
_HUNYUAN_NORMS = (
    (r"^context_embedder\.token_refiner\.refiner_blocks\.", "txt_in.individual_token_refiner.blocks."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.", r"double_blocks.\1.img_attn_q_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.", r"double_blocks.\1.img_attn_k_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.", r"double_blocks.\1.txt_attn_q_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.", r"double_blocks.\1.txt_attn_k_norm."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.", r"single_blocks.\1.q_norm."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.", r"single_blocks.\1.k_norm."),
    (r"^x_embedder\.", "img_in."),
)
_WAN = (
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
)
_SD3 = ((r"^pos_embed\.pos_embed$", "pos_embed"), (r"^pos_embed\.proj\.", "x_embedder.proj."))

CASES = {
    "Flux.2": Case(
        "Flux2Transformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)),
        "convert_flux2_transformer_checkpoint_to_diffusers", _FLUX_NORMS, "", "Flux2LoraLoaderMixin",
    ),
    "HunyuanVideo": Case(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=24, pooled_projection_dim=20,
             rope_axes_dim=(4, 6, 6)),
        "convert_hunyuan_video_transformer_to_diffusers", _HUNYUAN_NORMS, "", "HunyuanVideoLoraLoaderMixin",
    ),
    "SD3": Case("SD3Transformer2DModel", TINY["SD3Transformer2DModel"],
                "convert_sd3_transformer_checkpoint_to_diffusers", _SD3, "model.diffusion_model.", "SD3LoraLoaderMixin"),
    "Wan": Case("WanTransformer3DModel", TINY["WanTransformer3DModel"], "convert_wan_transformer_to_diffusers", _WAN,
                "model.diffusion_model.", "WanLoraLoaderMixin"),
    "Qwen-Image": Case("QwenImageTransformer2DModel", TINY["QwenImageTransformer2DModel"], None, (),
                       "model.diffusion_model.", "QwenImageLoraLoaderMixin"),
    "LTX-Video": Case("LTXVideoTransformer3DModel", TINY["LTXVideoTransformer3DModel"],
                      "convert_ltx_transformer_checkpoint_to_diffusers", (), "model.diffusion_model.",
                      "LTXVideoLoraLoaderMixin"),
    "Z-Image": Case("ZImageTransformer2DModel", TINY["ZImageTransformer2DModel"],
                    "convert_z_image_transformer_checkpoint_to_diffusers", (), "", "ZImageLoraLoaderMixin"),
}  # fmt: skip
ARCH = {a.name: a for a in architectures()}


@pytest.fixture(scope="module")
def diffusers() -> Any:
    return oracle("diffusers", "diffusers")


def _model(diffusers: Any, case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(diffusers, case.cls)(**case.config).eval()


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


def _original_state(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original file's tensors from diffusers': each rule's parts stacked (halves exchanged where the rule
    says), the rest renamed by the case's list."""
    arch, case = ARCH[name], CASES[name]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    indices = {p for k in sd for p in k.split(".") if p.isdigit()} | {""}
    for rule in arch.rules + arch.checkpoint_rules:
        for index in sorted(indices):
            if ("{}" in rule.original) != bool(index):
                continue
            names = rule.diffusers_names(index)
            weight = sd.get(f"{names[0]}.weight")
            for leaf in ("weight", "bias"):
                parts = [sd.get(f"{n}.{leaf}") for n in names]
                if weight is None or any(p is None for p in parts):
                    continue
                fused = torch.cat([p for p in parts if p is not None])
                swap = weight.ndim == 2 and rule.swaps(*weight.shape)  # a norm's scale: 1-D
                out[f"{rule.original_name(index)}.{leaf}"] = _swap(fused) if swap else fused
                used |= {f"{n}.{leaf}" for n in names}
    for key, value in sd.items():
        if key not in used:
            for pattern, repl in case.renames:
                key = re.sub(pattern, repl, key)
            out[key] = value
    return out


@contextmanager
def _converter(name: str) -> Iterator[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]:
    """diffusers' single-file converter, its hardcoded HunyuanVideo single-block split (3072 ×3 + the rest) scaled
    to the tensor (q, k, v, mlp as 1:1:1:4)."""
    from diffusers.loaders import single_file_utils

    real = single_file_utils.torch

    class Scaled:
        def __getattr__(self, attr: str) -> Any:
            return getattr(real, attr)

        @staticmethod
        def split(t: torch.Tensor, sizes: Any, dim: int = 0) -> Any:
            if isinstance(sizes, tuple) and len(sizes) == 4 and sizes[-1] < 0:
                unit = t.shape[dim] // 7
                sizes = (unit, unit, unit, 4 * unit)
            return real.split(t, sizes, dim=dim)

    single_file_utils.torch = Scaled()  # type: ignore[assignment]
    try:
        yield getattr(single_file_utils, CASES[name].converter or "")
    finally:
        single_file_utils.torch = real


def _from_original(diffusers: Any, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict diffusers' single-file loading makes of an original file's tensors."""
    case = CASES[name]
    if case.converter is None:
        return {k.removeprefix(case.prefix): v for k, v in state.items()}
    with _converter(name) as convert:
        return dict(convert(dict(state)))


@pytest.fixture(scope="module", params=list(CASES))
def built(request: pytest.FixtureRequest, diffusers: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One architecture's bases (dir, pipe, original file) and an adapter in each layout."""
    name: str = request.param
    case = CASES[name]
    root = tmp_path_factory.mktemp(name.replace(".", ""))
    model = _model(diffusers, case)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "dir")
    model.save_pretrained(root / "pipe" / "transformer")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    (root / "pipe" / "vae").mkdir()
    (root / "pipe" / "vae" / "config.json").write_text("{}")
    original = {f"{case.prefix}{k}": v for k, v in _original_state(name, sd).items()}
    back = _from_original(diffusers, name, dict(original))  # the inverse is diffusers' own map, read backwards
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd), [k for k in sd if not torch.equal(back[k], sd[k])]
    save_tensors(root / "original.safetensors", original)
    adapter = _rule_adapter(ARCH[name], sd)
    layouts = ("kohya", "diffusers", "original")
    adapters = {to: save_adapter(adapter, root / f"lora-{to}.safetensors", format=to) for to in layouts}
    bases = {"dir": root / "dir", "pipe": root / "pipe", "original": root / "original.safetensors"}
    return {"name": name, "sd": sd, "bases": bases, "adapters": adapters}


def _merged_state(diffusers: Any, name: str, out: Path, kind: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    case = CASES[name]
    if kind == "original":
        state = _from_original(diffusers, name, load_file(out))
    else:
        where = out / "transformer" if kind == "pipe" else out
        state = getattr(diffusers, case.cls).from_pretrained(where).state_dict()
    model = _model(diffusers, case)
    model.load_state_dict(state, strict=True)  # diffusers' model takes it as it is
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_each_base_layout_is_detected(built: dict[str, Any]) -> None:
    from loractl.bases import detect_base, open_base

    kinds = {}
    for kind, path in built["bases"].items():
        assert detect_base(path) == "dit", path
        base = open_base(path)
        kinds[kind] = base.kind
        base.close()
    name = built["name"]
    # Qwen-Image's original names are diffusers': its single file is that layout under ComfyUI's prefix
    single = "diffusers" if name == "Qwen-Image" else "original"
    assert kinds == {"dir": f"{name} diffusers", "pipe": f"{name} diffusers", "original": f"{name} {single}"}
    stored = set(read_header(built["bases"]["original"]).tensors)
    assert set(OWN_NAMES.get(name, ())) <= stored, sorted(set(OWN_NAMES[name]) - stored)


# names only the models' own checkpoints use (what diffusers' converters rename), in the hand-built single files
OWN_NAMES = {
    "LTX-Video": tuple(f"model.diffusion_model.{n}.weight" for n in ("patchify_proj", "adaln_single.linear",
                       "adaln_single.emb.timestep_embedder.linear_1", "transformer_blocks.1.attn2.k_norm")),
    "Z-Image": ("layers.1.attention.qkv.weight", "noise_refiner.0.attention.out.weight",
                "context_refiner.0.attention.q_norm.weight", "x_embedder.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.weight"),
}  # fmt: skip


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "original"])
@pytest.mark.parametrize("kind", ["dir", "pipe", "original"])
def test_merge_into_each_layout_is_w_plus_delta(
    diffusers: Any, built: dict[str, Any], tmp_path: Path, kind: str, layout: str
) -> None:
    from loractl.ops.merge import merge

    name, sd, path = built["name"], built["sd"], built["adapters"][layout]
    out = tmp_path / ("merged.safetensors" if kind == "original" else "merged")
    report = merge(built["bases"][kind], [path], out, weights=[0.75])
    adapter = load_adapter(path)
    assert {m.module for m in report.modules} == set(adapter.modules)
    want = dict(sd)
    for module, m in in_layout(adapter, "diffusers").modules.items():
        key = module.removeprefix("transformer.") + ".weight"
        want[key] = sd[key] + 0.75 * m.delta_weight()
    got = _merged_state(diffusers, name, out, kind)
    assert set(got) == set(want)
    changed = [k for k in want if not torch.equal(want[k], sd[k])]
    assert len(changed) >= len(in_layout(adapter, "diffusers").modules)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key
    if kind == "pipe":
        assert (out / "vae" / "config.json").is_file() and (out / "model_index.json").is_file()


@pytest.mark.parametrize("kind", ["dir", "original"])
def test_merge_equals_diffusers_fuse_lora(diffusers: Any, built: dict[str, Any], tmp_path: Path, kind: str) -> None:
    """diffusers' own merge of the diffusers-layout file: `lora_state_dict` + `load_lora_adapter` + `fuse_lora`."""
    from diffusers import loaders

    from loractl.ops.merge import merge

    name, case, path = built["name"], CASES[built["name"]], built["adapters"]["diffusers"]
    out = tmp_path / ("merged.safetensors" if kind == "original" else "merged")
    merge(built["bases"][kind], [path], out, weights=[0.8])
    model = _model(diffusers, case)
    state, metadata = getattr(loaders, case.mixin).lora_state_dict(str(path), return_lora_metadata=True)
    model.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    model.fuse_lora(lora_scale=0.8)
    model.unload_lora()
    fused = model.state_dict()
    merged = _merged_state(diffusers, name, out, kind)
    assert any(not torch.equal(fused[k], built["sd"][k]) for k in fused)
    for key in fused:
        assert torch.allclose(merged[key], fused[key], rtol=0, atol=1e-6), key


@pytest.mark.parametrize("pair", [("dir", "dir"), ("original", "original"), ("original", "dir"), ("dir", "original")])
def test_extract_from_either_layout_gives_the_delta(
    built: dict[str, Any], tmp_path: Path, pair: tuple[str, str]
) -> None:
    """A fine-tune made by merging the kohya file; extracted (diffusers layout, the adapter's rank) from a base in
    either layout, each module's ΔW is the merged one; merged back into its base, the record matches."""
    from loractl.ops.extract import extract
    from loractl.ops.extract_factor import ExtractConfig
    from loractl.ops.merge import merge

    base_kind, ft_kind = pair
    path = built["adapters"]["kohya"]
    ft = tmp_path / ("ft.safetensors" if ft_kind == "original" else "ft")
    merge(built["bases"][ft_kind], [path], ft)
    out = tmp_path / "extracted.safetensors"
    extract(built["bases"][base_kind], ft, out, ExtractConfig(rank=2), format="diffusers")
    got = in_layout(load_adapter(out), "diffusers").modules
    want = in_layout(load_adapter(path), "diffusers").modules
    assert set(got) == set(want)
    for module, m in want.items():
        delta = m.delta_weight()
        assert (got[module].delta_weight() - delta).norm() <= 1e-5 * delta.norm(), module
    report = merge(built["bases"][base_kind], [out], tmp_path / ("again.sft" if base_kind == "original" else "again"))
    assert not report.base_notes


def test_report_tells_the_tensors_of_a_fused_module_apart(built: dict[str, Any], tmp_path: Path) -> None:
    """A fused module merged on several split tensors: one row per tensor, each naming its own, every line in 80 columns;
    --json carries each row's tensor key."""
    from helpers import run_cli

    base, path = built["bases"]["dir"], built["adapters"]["kohya"]
    code, out, _ = run_cli("merge", base, path, "-o", tmp_path / "a", "--json")
    assert code == 0
    rows = json.loads(out)["modules"]
    keys = [(r["module"], r["tensor"]) for r in rows]
    assert len(set(keys)) == len(keys)
    fused = {r["module"] for r in rows if sum(s["module"] == r["module"] for s in rows) > 1}
    assert bool(fused) == any(len(rule.parts) > 1 for rule in ARCH[built["name"]].rules)
    code, text, _ = run_cli("merge", base, path, "-o", tmp_path / "b")
    assert code == 0 and [line for line in text.splitlines() if len(line) > 80] == []
    if len(rows) <= 40:  # the table (longer reports give a summary, rows in --json)
        shown = [line for line in text.splitlines() if "→" in line]
        assert len(shown) == sum(r["module"] in fused for r in rows)
    if built["name"] == "Flux.2":
        assert "img_attn.qkv → to_q" in text and "txt_attn.qkv → add_k_proj" in text


def test_text_encoders_sharing_their_names_are_refused(diffusers: Any, tmp_path: Path) -> None:
    """SD3's pipeline: two CLIP encoders, both named `text_model.…` (as stored), cannot be told apart by a merged
    tensor's name: their modules are refused, naming the component; the T5 (`text_encoder_3/`) takes its own."""
    import shutil

    import transformers
    from helpers import random_module

    from loractl.adapter import Adapter
    from loractl.ops.merge_plan import plan_merge

    pipe = tmp_path / "pipe"
    _model(diffusers, CASES["SD3"]).save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text("{}")
    clip = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1)  # fmt: skip
    transformers.CLIPTextModel(clip).save_pretrained(pipe / "text_encoder")
    shutil.copytree(pipe / "text_encoder", pipe / "text_encoder_2")
    t5 = transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)
    transformers.T5EncoderModel(t5).save_pretrained(pipe / "text_encoder_3")
    adapter = Adapter(modules={
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": random_module(16, 16, 2),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": random_module(16, 16, 2, seed=1),
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q": random_module(16, 16, 2, seed=2),
        "transformer.transformer_blocks.0.attn.to_q": random_module(16, 16, 2, seed=3),
    })  # fmt: skip
    for layout in ("kohya", "diffusers"):
        plan = plan_merge(pipe, [save_adapter(adapter, tmp_path / f"{layout}.safetensors", format=layout)])
        refused = {p.module: p for p in plan.problems}
        assert set(refused) == {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"}, layout  # fmt: skip
        assert all(p.code == "not-in-base" and "shares" in p.message and p.hint for p in refused.values())


def test_a_bare_musubi_hunyuan_video_file_of_shared_names_merges_into_a_hunyuan_video_base(
    diffusers: Any, tmp_path: Path
) -> None:
    """musubi-tuner's `lora_unet_double_blocks_0_img_attn_qkv` and `…single_blocks_0_linear1` without loractl's record
    are Flux.1's names as much (read so): on a HunyuanVideo base, in either layout, they are its `img_attn_qkv` and
    `linear1`, and the merged weights are W + ΔW by hand."""
    from helpers import random_module
    from safetensors.torch import load_file

    from loractl.adapter import Adapter
    from loractl.ops.merge import merge

    name = "HunyuanVideo"
    model = _model(diffusers, CASES[name])
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "dir")
    save_tensors(tmp_path / "original.safetensors", _original_state(name, sd))
    width = sd["transformer_blocks.0.attn.to_q.weight"].shape[1]
    modules = {"transformer.double_blocks.0.img_attn_qkv": random_module(3 * width, width, 2, alpha=3.0),
               "transformer.single_blocks.0.linear1": random_module(7 * width, width, 2, alpha=3.0, seed=1)}  # fmt: skip
    written = save_adapter(Adapter(modules=modules), tmp_path / "loractl.safetensors", format="kohya")
    save_tensors(tmp_path / "bare.safetensors", load_file(written))  # as musubi-tuner writes it: no record
    assert set(load_adapter(tmp_path / "bare.safetensors").modules) == {
        "transformer.double_blocks.0.img_attn.qkv", "transformer.single_blocks.0.linear1"}  # fmt: skip
    want = dict(sd)
    for module, m in in_layout(Adapter(modules=modules), "diffusers").modules.items():
        key = module.removeprefix("transformer.") + ".weight"
        want[key] = sd[key] + m.delta_weight()
    for kind in ("dir", "original"):
        out = tmp_path / ("merged.safetensors" if kind == "original" else "merged")
        merge(
            tmp_path / ("original.safetensors" if kind == "original" else "dir"), [tmp_path / "bare.safetensors"], out
        )
        got = _merged_state(diffusers, name, out, kind)
        assert sum(not torch.equal(want[k], sd[k]) for k in want) == 7  # q, k, v twice, and the MLP's input
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), (kind, key)


@pytest.mark.parametrize("name", ["LTX-Video", "Z-Image"])
def test_an_adapter_in_the_checkpoint_s_own_names_lands_on_either_base(
    diffusers: Any, tmp_path: Path, name: str
) -> None:
    """An adapter named as the model's own checkpoint names its modules (ComfyUI's native names: LTX-Video's
    `patchify_proj`, `adaln_single.linear`; Z-Image's fused `attention.qkv`, `attention.out`, `x_embedder`): on
    diffusers' directory a fused module's ΔW is split in thirds as diffusers' converter splits the weight
    (`torch.chunk`), on the single file it is the stored tensor's own; the merged weights are W + ΔW by hand."""
    from helpers import random_module

    from loractl.adapter import Adapter
    from loractl.ops.merge import merge

    case = CASES[name]
    sd = {k: v.detach().clone() for k, v in _model(diffusers, case).state_dict().items()}
    _model(diffusers, case).save_pretrained(tmp_path / "dir")
    original = {f"{case.prefix}{k}": v for k, v in _original_state(name, sd).items()}
    save_tensors(tmp_path / "original.safetensors", original)
    own = {
        "LTX-Video": {"patchify_proj": "proj_in", "adaln_single.linear": "time_embed.linear"},
        "Z-Image": {"layers.1.attention.qkv": "layers.1.attention.to_{}", "noise_refiner.0.attention.out":
                    "noise_refiner.0.attention.to_out.0", "x_embedder": "all_x_embedder.2-1"},
    }[name]  # fmt: skip
    modules = {}
    for i, module in enumerate(own):
        out, inp = original[f"{case.prefix}{module}.weight"].shape
        modules[f"transformer.{module}"] = random_module(out, inp, 2, alpha=3.0, seed=i)
    path = save_adapter(Adapter(modules=modules), tmp_path / "own.safetensors", format="original")
    assert set(load_adapter(path).modules) == set(modules)
    want = dict(sd)
    for module, diffusers_name in own.items():
        delta = modules[f"transformer.{module}"].delta_weight()
        parts = [diffusers_name.format(p) for p in "qkv"] if "{}" in diffusers_name else [diffusers_name]
        for part, rows in zip(parts, torch.chunk(delta, len(parts)), strict=True):
            want[f"{part}.weight"] = sd[f"{part}.weight"] + rows
    for kind in ("dir", "original"):
        out = tmp_path / ("merged.safetensors" if kind == "original" else "merged")
        merge(tmp_path / ("original.safetensors" if kind == "original" else "dir"), [path], out)
        got = _merged_state(diffusers, name, out, kind)
        assert sum(not torch.equal(want[k], sd[k]) for k in want) == len(own) + 2 * (name == "Z-Image")
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), (kind, key)
    if name == "Z-Image":  # converted, it is in diffusers' names, and diffusers' own fuse_lora of it agrees
        from diffusers import loaders

        from loractl.ops.convert import convert

        convert(path, tmp_path / "d.safetensors", to="diffusers")
        model = _model(diffusers, case)
        state, metadata = getattr(loaders, case.mixin).lora_state_dict(
            str(tmp_path / "d.safetensors"), return_lora_metadata=True
        )
        assert {k.split(".lora_")[0] for k in state} == {
            f"transformer.{n}" for n in ("layers.1.attention.to_q", "layers.1.attention.to_k", "layers.1.attention.to_v",
                                         "noise_refiner.0.attention.to_out.0", "all_x_embedder.2-1")}  # fmt: skip
        model.load_lora_adapter(state, prefix="transformer", metadata=metadata)
        model.fuse_lora()
        model.unload_lora()
        for key, value in model.state_dict().items():
            assert torch.allclose(value, want[key], rtol=0, atol=1e-6), key
