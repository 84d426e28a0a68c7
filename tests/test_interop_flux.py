"""diffusers judges loractl's Flux.1 LoRAs in every layout (issue 25).

A tiny `FluxTransformer2DModel` (random weights, no download) loads each file through diffusers'
own reader (`FluxLoraLoaderMixin.lora_state_dict`, which converts kohya files, then the
transformer's `load_lora_adapter`) and must give the outputs of loractl's ΔW added by hand.
diffusers' kohya converter hardcodes Flux.1's real single-block widths (3072 ×3 + 12288 in
`linear1`), so single blocks are checked at those widths on the state dicts instead: diffusers'
converted ΔW per module against loractl's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_module, target_findings
from oracles import oracle

from loractl.adapter import Adapter
from loractl.formats import in_layout, load_adapter, save_adapter
from loractl.ops.convert import convert

pytestmark = pytest.mark.interop
H = 32  # the tiny model's width: 2 heads of 16


@pytest.fixture(scope="module")
def diffusers() -> Any:
    return oracle("diffusers", "diffusers")


def _model(diffusers: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 6, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
        "pooled_projections": torch.randn(1, 20, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randn(6, 3, generator=g),
        "txt_ids": torch.zeros(5, 3),
    }


def _run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(), return_dict=False)[0]


def _by_hand(diffusers: Any, adapter: Adapter) -> torch.Tensor:
    """The tiny model with loractl's ΔW (in diffusers' layout) added to each weight."""
    model = _model(diffusers)
    split = in_layout(adapter, "diffusers")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in split.modules.items():
            params[name.removeprefix("transformer.") + ".weight"] += m.delta_weight()
    return _run(model)


def _by_diffusers(diffusers: Any, path: Path, dropped: set[str] = frozenset()) -> torch.Tensor:  # type: ignore[assignment]
    """The outputs with diffusers' reading of `path`; `dropped`: the modules its converter names without
    `transformer.`, which `load_lora_weights` then leaves out (checked to be exactly these)."""
    from diffusers.loaders import FluxLoraLoaderMixin

    model = _model(diffusers)
    state, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True
    )
    model.load_lora_adapter(state, prefix="transformer", network_alphas=alphas or None, metadata=metadata)
    unprefixed = {k.rsplit(".lora_", 1)[0] for k in state if not k.startswith("transformer.")}
    assert unprefixed == dropped
    return _run(model)


DROPPED_FROM_KOHYA = {
    "x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1", "proj_out", "norm_out.linear",
}  # fmt: skip


def _original_adapter() -> Adapter:
    """Every Flux.1 module the tiny model has except single-block linear1 (diffusers hardcodes its widths)."""
    widths = {
        "double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.txt_attn.qkv": (3 * H, H),
        "double_blocks.0.img_attn.proj": (H, H), "double_blocks.0.txt_attn.proj": (H, H),
        "double_blocks.0.img_mlp.0": (4 * H, H), "double_blocks.0.img_mlp.2": (H, 4 * H),
        "double_blocks.0.txt_mlp.0": (4 * H, H), "double_blocks.0.txt_mlp.2": (H, 4 * H),
        "double_blocks.0.img_mod.lin": (6 * H, H), "double_blocks.0.txt_mod.lin": (6 * H, H),
        "single_blocks.0.linear2": (H, 5 * H), "single_blocks.0.modulation.lin": (3 * H, H),
        "img_in": (H, 4), "txt_in": (H, 24), "time_in.in_layer": (H, 256), "vector_in.out_layer": (H, H),
        "guidance_in.in_layer": (H, 256), "final_layer.linear": (4, H), "final_layer.adaLN_modulation.1": (2 * H, H),
    }  # fmt: skip
    modules = {
        f"transformer.{name}": random_module(out, inp, 2 + i % 3, alpha=float(1 + i % 4), seed=i)
        for i, (name, (out, inp)) in enumerate(widths.items())
    }
    return Adapter(modules={n: _small(m) for n, m in modules.items()})


def _small(m: Any) -> Any:
    from dataclasses import replace

    return replace(m, A=m.A * 0.05, B=m.B * 0.05)


def _close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert (got - want).norm() <= 1e-6 * want.norm(), float((got - want).norm() / want.norm())


def test_kohya_file_reads_in_diffusers_as_loractl_applies_it(diffusers: Any, tmp_path: Path) -> None:
    adapter = _original_adapter()
    path = save_adapter(adapter, tmp_path / "flux.safetensors", format="kohya")
    read = load_adapter(path)
    assert set(read.modules) == set(adapter.modules)  # lora_unet_double_blocks_0_img_attn_qkv → transformer.…
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, read)
    # diffusers 0.42's kohya converter names the embedders and the final layer without `transformer.`:
    # load_lora_weights leaves them out (validate --target diffusers says so); the blocks load exactly
    blocks = Adapter(modules={n: m for n, m in read.modules.items() if "blocks." in n})
    _close(_by_diffusers(diffusers, path, DROPPED_FROM_KOHYA), _by_hand(diffusers, blocks), base)
    # validate --target diffusers names exactly the modules diffusers left out
    assert sorted(target_findings(path, "diffusers")["unknown-module"]) == sorted(
        set(read.modules) - set(blocks.modules)
    )
    for to in ("diffusers", "kohya", "original", "peft"):
        out = tmp_path / f"as-{to}"
        convert(path, out, to=to)
        if to != "peft":
            dropped = DROPPED_FROM_KOHYA if to in ("kohya", "original") else set()
            _close(
                _by_diffusers(diffusers, out, dropped), want if to == "diffusers" else _by_hand(diffusers, blocks), base
            )
        _close(_by_hand(diffusers, load_adapter(out)), want, base)


def test_diffusers_parts_with_their_own_a_stack_for_kohya(diffusers: Any, tmp_path: Path) -> None:
    """q, k, v trained apart (diffusers' layout): kohya's fused qkv is block-diagonal, rank 2+3+4, exact."""
    parts = {f"transformer.transformer_blocks.0.attn.to_{p}": _small(random_module(H, H, r, alpha=float(r + i), seed=9 + i))
             for i, (p, r) in enumerate(zip("qkv", (2, 3, 4), strict=True))}  # fmt: skip
    parts["transformer.transformer_blocks.0.attn.add_k_proj"] = _small(random_module(H, H, 2, seed=20))
    # a single block says Flux.1: at this tiny width, double blocks alone are named as SD3's joint blocks
    parts["transformer.single_transformer_blocks.0.proj_out"] = _small(random_module(H, 5 * H, 2, seed=21))
    adapter = Adapter(modules=parts)
    path = save_adapter(adapter, tmp_path / "split.safetensors", format="diffusers")
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, adapter)
    _close(_by_diffusers(diffusers, path), want, base)
    report = convert(path, tmp_path / "fused.safetensors", to="kohya")
    fused = load_adapter(tmp_path / "fused.safetensors")
    assert fused.modules["transformer.double_blocks.0.img_attn.qkv"].rank == 9
    assert any("block-diagonally" in f for f in report.folded), report.folded
    _close(_by_diffusers(diffusers, tmp_path / "fused.safetensors"), want, base)
    _close(_by_hand(diffusers, fused), want, base)


def _single_block_kohya(tmp_path: Path) -> Path:
    """Real Flux.1 widths: linear1 is (21504, 3072) = q, k, v (3072 each) and the MLP's input (12288)."""
    modules = {
        "transformer.single_blocks.0.linear1": random_module(21504, 3072, 2, alpha=1.0, seed=3),
        "transformer.single_blocks.1.linear2": random_module(3072, 15360, 2, alpha=4.0, seed=4),
    }
    return save_adapter(Adapter(modules=modules), tmp_path / "single.safetensors", format="kohya")


def _diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """diffusers' converted state dict as ΔW per module (kohya's alpha is baked into its A and B)."""
    from diffusers.loaders import FluxLoraLoaderMixin

    state, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    out = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            a, b = state[key].double(), state[f"{module}.lora_B.weight"].double()
            alpha = (alphas or {}).get(f"{module}.alpha")
            out[module] = b @ a * (float(alpha) / a.shape[0] if alpha is not None else 1.0)
    return out


def test_single_blocks_at_real_widths_match_diffusers_deltas(diffusers: Any, tmp_path: Path) -> None:
    """ΔW state dicts, not outputs: diffusers' converter needs the real widths, too large for a default test model."""
    path = _single_block_kohya(tmp_path)
    split = in_layout(load_adapter(path), "diffusers")
    assert sorted(split.modules) == sorted(
        [f"transformer.single_transformer_blocks.0.attn.to_{p}" for p in "qkv"]
        + ["transformer.single_transformer_blocks.0.proj_mlp", "transformer.single_transformer_blocks.1.proj_out"]
    )
    theirs = _diffusers_deltas(path)
    assert sorted(theirs) == sorted(split.modules)
    for name, m in split.modules.items():
        ours = m.delta_weight(torch.float64)
        assert (theirs[name] - ours).norm() <= 1e-6 * ours.norm(), name
    convert(path, tmp_path / "split.safetensors", to="diffusers")
    convert(tmp_path / "split.safetensors", tmp_path / "back.safetensors", to="kohya")
    back = load_adapter(tmp_path / "back.safetensors")
    assert back.modules["transformer.single_blocks.0.linear1"].rank == 2  # one shared A: fused at the same rank
    again = _diffusers_deltas(tmp_path / "back.safetensors")
    for name, delta in theirs.items():
        assert (again[name] - delta).norm() <= 1e-6 * delta.norm(), name


def test_xlabs_file_reads_as_diffusers_reads_it(diffusers: Any, tmp_path: Path) -> None:
    """XLabs' processors (`qkv_lora1` = img_attn.qkv, `proj_lora2` = txt_attn.proj; no alpha: scale 1)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    shapes = {"qkv_lora1": (3 * H, H), "qkv_lora2": (3 * H, H), "proj_lora1": (H, H), "proj_lora2": (H, H)}
    state = {}
    for what, (out, inp) in shapes.items():
        state[f"double_blocks.0.processor.{what}.down.weight"] = torch.randn(2, inp, generator=g) * 0.05
        state[f"double_blocks.0.processor.{what}.up.weight"] = torch.randn(out, 2, generator=g) * 0.05
    save_file(state, tmp_path / "xlabs.safetensors")
    read = load_adapter(tmp_path / "xlabs.safetensors")
    assert read.meta.source_format == "original" and {m.scale for m in read.modules.values()} == {1.0}
    base = _run(_model(diffusers))
    want = _by_hand(diffusers, read)
    _close(_by_diffusers(diffusers, tmp_path / "xlabs.safetensors"), want, base)
    for to in ("diffusers", "kohya", "original"):
        convert(tmp_path / "xlabs.safetensors", tmp_path / f"as-{to}", to=to)
        _close(_by_diffusers(diffusers, tmp_path / f"as-{to}"), want, base)


def _fal_kontext_file(tmp_path: Path) -> Path:
    """fal's Kontext layout at Flux.1's real widths: every one of the 19 double and 38 single blocks' modules
    (diffusers' converter takes nothing less), rank 1, `base_model.model.` + BFL names, no alpha."""
    from safetensors.torch import save_file

    h = 3072
    double = {"img_mod.lin": (6 * h, h), "txt_mod.lin": (6 * h, h), "img_attn.qkv": (3 * h, h), "txt_attn.qkv": (3 * h, h),
              "img_attn.proj": (h, h), "txt_attn.proj": (h, h), "img_mlp.0": (4 * h, h), "img_mlp.2": (h, 4 * h),
              "txt_mlp.0": (4 * h, h), "txt_mlp.2": (h, 4 * h)}  # fmt: skip
    single = {"linear1": (7 * h, h), "linear2": (h, 5 * h), "modulation.lin": (3 * h, h)}
    shapes = {f"double_blocks.{i}.{k}": v for i in range(19) for k, v in double.items()}
    shapes |= {f"single_blocks.{i}.{k}": v for i in range(38) for k, v in single.items()}
    shapes["final_layer.linear"] = (64, h)
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(1, inp, generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, 1, generator=g)
    save_file(state, tmp_path / "kontext.safetensors")
    return tmp_path / "kontext.safetensors"


@pytest.mark.slow  # 57 blocks at Flux.1's real widths: about 20 MB of factors (2 min on a loaded 2-core machine)
def test_fal_kontext_file_reads_as_diffusers_reads_it(diffusers: Any, tmp_path: Path) -> None:
    """ΔW against diffusers' converted state dict, by products with random vectors (a 21504×3072 ΔW per module
    would be 0.5 GB in float64): every module, exact to 1e-6."""
    from diffusers.loaders import FluxLoraLoaderMixin

    path = _fal_kontext_file(tmp_path)
    split = in_layout(load_adapter(path), "diffusers")
    theirs = FluxLoraLoaderMixin.lora_state_dict(str(path))
    modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert modules == set(split.modules)
    g = torch.Generator().manual_seed(8)
    for name in sorted(modules):
        m = split.modules[name]
        x = torch.randn(m.in_features, 2, generator=g, dtype=torch.float64)
        want = m.B.double() @ (m.A.double() @ x) * m.scale
        got = theirs[f"{name}.lora_B.weight"].double() @ (theirs[f"{name}.lora_A.weight"].double() @ x)
        assert (got - want).norm() <= 1e-6 * want.norm(), name


def _bfl_control_file(tmp_path: Path) -> Path:
    """BFL's Flux control LoRA layout at Flux.1's real widths (diffusers' converter takes every one of the 19 double
    and 38 single blocks and nothing less): bare BFL names, rank 1 (the final AdaLN 2), a `lora_B.bias` on the qkv and linear1 modules,
    the qk norms' new scales, `img_in` taking 128 channels (the control image's beside the noise's)."""
    from safetensors.torch import save_file

    h = 3072
    double = {"img_mod.lin": (6 * h, h), "txt_mod.lin": (6 * h, h), "img_attn.qkv": (3 * h, h), "txt_attn.qkv": (3 * h, h),
              "img_attn.proj": (h, h), "txt_attn.proj": (h, h), "img_mlp.0": (4 * h, h), "img_mlp.2": (h, 4 * h),
              "txt_mlp.0": (4 * h, h), "txt_mlp.2": (h, 4 * h)}  # fmt: skip
    single = {"linear1": (7 * h, h), "linear2": (h, 5 * h), "modulation.lin": (3 * h, h)}
    shapes = {f"double_blocks.{i}.{k}": v for i in range(19) for k, v in double.items()}
    shapes |= {f"single_blocks.{i}.{k}": v for i in range(38) for k, v in single.items()}
    shapes |= {"time_in.in_layer": (h, 256), "time_in.out_layer": (h, h), "vector_in.in_layer": (h, 768),
               "vector_in.out_layer": (h, h), "guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h),
               "txt_in": (h, 4096), "img_in": (h, 128), "final_layer.linear": (64, h),
               "final_layer.adaLN_modulation.1": (2 * h, h)}  # fmt: skip
    g = torch.Generator().manual_seed(9)
    state = {}
    for name, (out, inp) in shapes.items():
        rank = 2 if name.startswith("final_layer.adaLN") else 1  # diffusers halves this module's A: an even rank
        state[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        state[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
        if name.endswith(("qkv", "linear1")):
            state[f"{name}.lora_B.bias"] = torch.randn(out, generator=g)
    norms = [
        f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale"
        for i in range(19)
        for s in ("img", "txt")
        for q in ("query", "key")
    ]
    norms += [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(38) for q in ("query", "key")]  # fmt: skip
    state |= {k: torch.randn(128, generator=g) for k in norms}
    save_file(state, tmp_path / "control.safetensors")
    return tmp_path / "control.safetensors"


def _diffusers_norm(bfl: str) -> str:
    """BFL's qk-norm scale → diffusers' (`_convert_bfl_flux_control_lora_to_diffusers`)."""
    parts = bfl.removeprefix("transformer.").split(".")
    if parts[0] == "single_blocks":
        return f"transformer.single_transformer_blocks.{parts[1]}.attn.norm_{parts[3][0]}.weight"
    added = "added_" if parts[2] == "txt_attn" else ""
    return f"transformer.transformer_blocks.{parts[1]}.attn.norm_{added}{parts[4][0]}.weight"


@pytest.mark.slow  # 57 blocks at Flux.1's real widths (about 25 MB of factors)
def test_bfl_control_file_reads_as_diffusers_reads_it(diffusers: Any, tmp_path: Path) -> None:
    """Every module's ΔW and lora bias against diffusers' converted state dict (products with random vectors), the
    norm scales equal; except the final AdaLN, whose A's halves diffusers swaps with B's (not the same ΔW)."""
    from diffusers.loaders import FluxLoraLoaderMixin

    path = _bfl_control_file(tmp_path)
    read = load_adapter(path)
    split = in_layout(read, "diffusers")
    theirs = FluxLoraLoaderMixin.lora_state_dict(str(path))
    modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert modules == set(split.modules)
    assert {_diffusers_norm(n) for n in read.full_tensors} == {k for k in theirs if "lora" not in k}
    for name, t in read.full_tensors.items():
        assert torch.equal(theirs[_diffusers_norm(name)], t), name
    g = torch.Generator().manual_seed(8)
    for name in sorted(modules):
        m = split.modules[name]
        x = torch.randn(m.in_features, 2, generator=g, dtype=torch.float64)
        want = m.B.double() @ (m.A.double() @ x) * m.scale
        got = theirs[f"{name}.lora_B.weight"].double() @ (theirs[f"{name}.lora_A.weight"].double() @ x)
        if name == "transformer.norm_out.linear":
            assert (got - want).norm() > 1e-3 * want.norm()  # diffusers swapped A's halves too
            continue
        assert (got - want).norm() <= 1e-6 * want.norm(), name
        if m.bias is not None:
            assert torch.equal(theirs[f"{name}.lora_B.bias"], m.bias), name
    assert sorted(target_findings(path, "diffusers")) == ["swapped-halves"]


def _tiny_control_file(tmp_path: Path) -> Path:
    """BFL's control layout at the tiny model's widths (diffusers' own reader of it hardcodes Flux.1's): bare BFL
    names, no alpha, `lora_B.bias` on the fused qkv and linear1, `img_in` taking 8 channels where the model has 4,
    the final AdaLN (halves swapped between the layouts), and block 0's six qk-norm scales."""
    from safetensors.torch import save_file

    shapes = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.txt_attn.qkv": (3 * H, H),
              "double_blocks.0.img_mlp.0": (4 * H, H), "double_blocks.0.txt_mod.lin": (6 * H, H),
              "single_blocks.0.linear1": (7 * H, H), "single_blocks.0.linear2": (H, 5 * H), "img_in": (H, 8),
              "txt_in": (H, 24), "final_layer.adaLN_modulation.1": (2 * H, H)}  # fmt: skip
    g = torch.Generator().manual_seed(11)
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"{name}.lora_A.weight"] = torch.randn(2, inp, generator=g) * 0.2
        state[f"{name}.lora_B.weight"] = torch.randn(out, 2, generator=g) * 0.2
        if name.endswith(("qkv", "linear1")):
            state[f"{name}.lora_B.bias"] = torch.randn(out, generator=g) * 0.1
    norms = [f"double_blocks.0.{s}_attn.norm.{q}_norm.scale" for s in ("img", "txt") for q in ("query", "key")]
    norms += [f"single_blocks.0.norm.{q}_norm.scale" for q in ("query", "key")]
    state |= {k: 1 + 0.3 * torch.randn(16, generator=g) for k in norms}
    save_file(state, tmp_path / "control.safetensors")
    return tmp_path / "control.safetensors"


def _widened_inputs() -> dict[str, torch.Tensor]:
    """The control pipeline's input: the control image's latents (4 more channels) beside the noise's."""
    g = torch.Generator().manual_seed(12)
    inputs = _inputs()
    return inputs | {"hidden_states": torch.cat([inputs["hidden_states"], torch.randn(1, 6, 4, generator=g)], -1)}


def test_bfl_control_lora_converted_to_diffusers_loads_in_load_lora_weights(diffusers: Any, tmp_path: Path) -> None:
    """FluxControlPipeline's `load_lora_weights` of loractl's diffusers file (it widens x_embedder and loads the norm
    scales) gives the outputs of the adapter applied by hand: x_embedder widened with zeros, ΔW and lora biases
    added, norms set."""
    path = _tiny_control_file(tmp_path)
    convert(path, tmp_path / "d.safetensors", to="diffusers")
    read = in_layout(load_adapter(path), "diffusers")

    model = _model(diffusers)
    with torch.no_grad():
        base = model(**_inputs(), return_dict=False)[0]
        old = model.x_embedder
        model.x_embedder = torch.nn.Linear(8, old.out_features)
        model.x_embedder.weight.zero_()
        model.x_embedder.weight[:, :4] = old.weight
        model.x_embedder.bias.copy_(old.bias)
        params = dict(model.named_parameters())
        for name, m in read.modules.items():
            params[name.removeprefix("transformer.") + ".weight"] += m.delta_weight()
            if m.bias is not None:
                params[name.removeprefix("transformer.") + ".bias"] += m.bias * m.scale
        for name, t in read.full_tensors.items():
            params[name.removeprefix("transformer.")].copy_(t)
        want = model(**_widened_inputs(), return_dict=False)[0]

    none = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = diffusers.FluxControlPipeline(transformer=_model(diffusers), **none)
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    assert pipe.transformer.x_embedder.in_features == 8
    with torch.no_grad():
        got = pipe.transformer(**_widened_inputs(), return_dict=False)[0]
    assert (want - base).abs().max() > 1e-3
    assert (got - want).norm() <= 1e-6 * want.norm(), float((got - want).norm() / want.norm())


@pytest.mark.slow  # 57 blocks at Flux.1's real widths (about 25 MB of factors, twice)
def test_bfl_control_file_converted_to_diffusers_reads_as_the_original(diffusers: Any, tmp_path: Path) -> None:
    """diffusers' state dict of loractl's diffusers file against diffusers' reading of the BFL original: its keys
    (and zero lora biases where the original has none), norm scales and lora biases, and every module's ΔW; except the final AdaLN, where diffusers' reader of
    the original swaps A's halves too and loractl's file holds the adapter's own ΔW. Back to BFL's layout: bit for bit."""
    from diffusers.loaders import FluxLoraLoaderMixin
    from safetensors.torch import load_file

    path = _bfl_control_file(tmp_path)
    convert(path, tmp_path / "d.safetensors", to="diffusers")
    ours = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path / "d.safetensors"))
    theirs = FluxLoraLoaderMixin.lora_state_dict(str(path))
    filled = set(ours) - set(theirs)  # every module gets a lora bias (zeros) where some have one: PEFT wants them all
    assert set(theirs) <= set(ours) and filled and all(k.endswith(".lora_B.bias") and not ours[k].any() for k in filled)
    split = in_layout(load_adapter(path), "diffusers")
    g = torch.Generator().manual_seed(8)
    for key in sorted(k for k in theirs if "lora_A" not in k and "lora_B.weight" not in k):
        assert torch.equal(ours[key], theirs[key]), key  # norm scales and lora biases
    for name in sorted(k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")):
        m = split.modules[name]
        x = torch.randn(m.in_features, 2, generator=g, dtype=torch.float64)
        got, their = (sd[f"{name}.lora_B.weight"].double() @ (sd[f"{name}.lora_A.weight"].double() @ x)
                      for sd in (ours, theirs))  # fmt: skip
        want = m.B.double() @ (m.A.double() @ x) * m.scale
        assert (got - want).norm() <= 1e-6 * want.norm(), name
        if name != "transformer.norm_out.linear":
            assert (got - their).norm() <= 1e-6 * want.norm(), name
    convert(tmp_path / "d.safetensors", tmp_path / "o.safetensors", to="original")
    original, again = load_file(path), load_file(tmp_path / "o.safetensors")
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in original)
