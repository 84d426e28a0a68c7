"""diffusers judges loractl's diffusers and kohya files (issue 13 item 3).

`pipe.load_lora_weights(...)` (PEFT backend; for kohya files diffusers' own kohya → diffusers
key converter) on tiny SD 1.x and SDXL pipelines must change every component's output exactly as
adding scale·B·A to the weights by hand does: linear and conv (LoCon) modules, per-module
ranks and alphas, both SDXL text encoders.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_module, run_cli
from interop_models import rel
from oracles import oracle
from safetensors.torch import load_file, save_file

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.formats import save_adapter

pytestmark = pytest.mark.interop
_TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def sd() -> Any:
    oracle("diffusers", "diffusers")
    import diffusers_pipelines

    return diffusers_pipelines


def _lora_modules(component: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention/feed-forward linears, proj_in/out and the resnets' 3×3 conv1 (UNet); every projection (CLIP)."""
    out = {}
    for name, layer in model.named_modules():
        if component == "unet":
            keep = (".attentions." in name and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))) or (
                name.endswith("resnets.0.conv1")
            )
        else:
            keep = name.rsplit(".", 1)[-1] in _TE_LEAVES
        if keep:
            out[f"{component}.{name}"] = layer
    return out


def _adapter(pipe: Any, sd: Any, alphas: tuple[float, ...] = (1.0, 4.0, 8.0)) -> Adapter:
    """Seeded random LoRA on those modules with ranks 2-4 and `alphas` by turns."""
    g = torch.Generator().manual_seed(3)
    modules = {}
    layers = {n: m for c, model in sd.components(pipe).items() for n, m in _lora_modules(c, model).items()}
    for i, (name, layer) in enumerate(sorted(layers.items())):
        rank, alpha = 2 + i % 3, alphas[i % 4 % len(alphas)]
        w = layer.weight
        conv = w.ndim == 4
        a = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        b = torch.randn(w.shape[0], rank, *((1, 1) if conv else ()), generator=g) * 0.1
        modules[name] = LoraModule(A=a, B=b, scale=alpha / rank, alpha=alpha, kind="conv" if conv else "linear")
    return Adapter(modules=modules, meta=AdapterMeta())


def _by_hand(pipe: Any, adapter: Adapter, sd: Any) -> dict[str, torch.Tensor]:
    """The components' outputs with W += scale·B·A added to copies of their weights, written out here."""
    patched = copy.copy(pipe)
    for component, model in sd.components(pipe).items():
        clone = copy.deepcopy(model)
        layers = dict(clone.named_modules())
        with torch.no_grad():
            for name, m in adapter.modules.items():
                if name.startswith(component + "."):
                    w = layers[name.removeprefix(component + ".")].weight
                    w += (m.scale * (m.B.flatten(1) @ m.A.flatten(1))).reshape(w.shape)
        setattr(patched, component, clone)
    return sd.outputs(patched)


def _errors(sd: Any, layout: str, target: str, alphas: tuple[float, ...], tmp_path: Path) -> dict[str, float]:
    """Per component: how far diffusers' change of the output is from the by-hand one (relative)."""
    pipe = getattr(sd, layout)()
    adapter = _adapter(pipe, sd, alphas)
    before, expected = sd.outputs(pipe), _by_hand(pipe, adapter, sd)
    path = save_adapter(adapter, tmp_path / "lora.safetensors", format=target)

    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    got = sd.outputs(pipe)

    assert got.keys() == expected.keys() == set(sd.components(pipe))
    for name in got:
        assert rel(expected[name] - before[name], before[name]) > 1e-2, name  # every component visibly changes
    return {name: rel(got[name] - before[name], expected[name] - before[name]) for name in got}


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_load_lora_weights_applies_diffusers_file(sd: Any, layout: str, tmp_path: Path) -> None:
    """PEFT keys + per-component LoraConfig metadata: per-module ranks and alphas all arrive."""
    errors = _errors(sd, layout, "diffusers", (1.0, 4.0, 8.0), tmp_path)
    assert max(errors.values()) < 1e-4, errors  # float32 noise of the outputs: ~1e-6


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_diffusers_kohya_reader_accepts_loractl_kohya_file(sd: Any, layout: str, tmp_path: Path) -> None:
    """lora_unet_/lora_te_ (SDXL: lora_te1_/lora_te2_) names, LoCon conv, one alpha as sd-scripts writes it."""
    errors = _errors(sd, layout, "kohya", (4.0,), tmp_path)
    assert max(errors.values()) < 1e-4, errors


def test_diffusers_kohya_reader_loses_per_module_alphas(sd: Any, tmp_path: Path) -> None:
    """diffusers' kohya converter mangles the alpha_pattern keys of modules whose alpha differs from the
    first one, so those modules run at the wrong scale (`validate --target diffusers` warns)."""
    errors = _errors(sd, "sd15", "kohya", (1.0, 4.0, 8.0), tmp_path)
    assert min(errors.values()) > 0.05, errors  # measured 0.13 (UNet), 0.56 (text encoder)


_TE_Q = "text_encoder.encoder.layers.0.self_attn.q_proj"
_UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
_EMBEDDING = "text_encoder.embeddings.token_embedding"


def _file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _two_modules() -> Adapter:
    """A text-encoder q_proj and a UNet to_q LoRA (rank 2, scale 2)."""
    return Adapter(
        modules={_TE_Q: random_module(32, 32, 2, seed=1), _UNET_Q: random_module(32, 32, 2, seed=2)}, meta=AdapterMeta()
    )


def _loaded(sd: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """(outputs before, outputs after `load_lora_weights(path)`, the module paths it gave LoRA layers) on SD 1.x."""
    pipe = sd.sd15()
    before = sd.outputs(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    adapted = {
        f"{c}.{name.removesuffix('.lora_A')}"
        for c, model in sd.components(pipe).items()
        for name, _ in model.named_modules()
        if name.endswith(".lora_A")
    }
    return before, sd.outputs(pipe), adapted


def _way_out(sd: Any, adapter: Path, tmp_path: Path) -> set[str]:
    """What the finding's way out (`loractl convert --to diffusers`) makes diffusers adapt."""
    code, _, err = run_cli("convert", adapter, "--to", "diffusers", "-o", tmp_path / "way-out.safetensors")
    assert code == 0, err
    return _loaded(sd, tmp_path / "way-out.safetensors")[2]


def test_diffusers_loads_nothing_from_a_peft_file(sd: Any, tmp_path: Path) -> None:
    """A PEFT file's keys start with base_model.model.: load_lora_weights adapts nothing and says only a
    warning, so `validate --target diffusers` flags every module (unknown-module)."""
    from helpers import target_findings

    peft_file = save_adapter(_two_modules(), tmp_path / "peft", format="peft") / "adapter_model.safetensors"
    before, after, adapted = _loaded(sd, peft_file)
    assert not adapted
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert target_findings(peft_file.parent, "diffusers") == {"unknown-module": [_TE_Q, _UNET_Q]}
    assert _way_out(sd, peft_file.parent, tmp_path) == {_TE_Q, _UNET_Q}


def test_diffusers_loads_nothing_from_keys_without_a_component(sd: Any, tmp_path: Path) -> None:
    """Old attn-procs keys (`down_blocks….processor.to_q_lora.down.weight`, no `unet.`): loractl reads them as the
    UNet's, diffusers 0.42.1 adapts only the prefixed text-encoder module (unknown-module, no module named)."""
    from helpers import target_findings

    proc = _UNET_Q.removeprefix("unet.").removesuffix(".to_q") + ".processor.to_q_lora"
    g = torch.Generator().manual_seed(7)
    mixed = _file(tmp_path / "mixed.safetensors", {
        f"{proc}.down.weight": torch.randn(2, 32, generator=g), f"{proc}.up.weight": torch.randn(32, 2, generator=g),
        f"{_TE_Q}.lora_A.weight": torch.randn(2, 32, generator=g), f"{_TE_Q}.lora_B.weight": torch.randn(32, 2, generator=g),
    })  # fmt: skip
    assert _loaded(sd, mixed)[2] == {_TE_Q}
    assert target_findings(mixed, "diffusers") == {"unknown-module": [None]}
    assert _way_out(sd, mixed, tmp_path) == {_TE_Q, _UNET_Q}


def test_diffusers_refuses_full_tensors(sd: Any, tmp_path: Path) -> None:
    """loractl's diffusers file of the LoRA part loads; with a full tensor under its diffusers key (as
    modules_to_save would put it) load_lora_weights refuses the file (full-tensors-dropped)."""
    from helpers import target_findings

    g = torch.Generator().manual_seed(8)
    conv_in = torch.randn(32, 4, 3, 3, generator=g)
    plain = save_adapter(_two_modules(), tmp_path / "plain.safetensors", format="diffusers")
    assert _loaded(sd, plain)[2] == {_TE_Q, _UNET_Q}
    full = _file(tmp_path / "full.safetensors", {**load_file(str(plain)), "unet.conv_in.weight": conv_in})
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        _loaded(sd, full)
    with_full = replace(_two_modules(), full_tensors={"unet.conv_in.weight": conv_in})
    assert "full-tensors-dropped" in target_findings(
        save_adapter(with_full, tmp_path / "peft", format="peft"), "diffusers"
    )


def test_diffusers_applies_a_text_encoder_embedding_lora(sd: Any, tmp_path: Path) -> None:
    """Not a rule: diffusers 0.42.1 applies an embedding LoRA on a text encoder (PEFT keys lora_embedding_A/B)
    exactly as W + (B·A)ᵀ by hand, so `validate --target diffusers` has no embedding finding. A file whose only
    modules are embeddings it refuses: it cannot tell their key style."""
    from helpers import target_findings

    q, emb = (
        random_module(32, 32, 2, seed=1, alpha=2.0),
        random_module(32, 1000, 2, seed=3, alpha=2.0, kind="embedding"),
    )
    q_keys = {f"{_TE_Q}.lora_A.weight": q.A, f"{_TE_Q}.lora_B.weight": q.B}
    emb_keys = {f"{_EMBEDDING}.lora_embedding_A": emb.A * 0.1, f"{_EMBEDDING}.lora_embedding_B": emb.B * 0.1}
    before, after, adapted = _loaded(sd, _file(tmp_path / "qe.safetensors", {**q_keys, **emb_keys}))
    assert adapted == {_TE_Q, _EMBEDDING}

    by_hand = sd.sd15()
    with torch.no_grad():
        by_hand.text_encoder.embeddings.token_embedding.weight += (emb.B @ emb.A).T * 0.01
        by_hand.text_encoder.encoder.layers[0].self_attn.q_proj.weight += q.B @ q.A
    expected = sd.outputs(by_hand)
    for name in after:
        assert rel(after[name] - before[name], expected[name] - before[name]) < 1e-4, name  # float32: ~1e-6
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        _loaded(sd, _file(tmp_path / "e.safetensors", emb_keys))

    both = Adapter(modules={_TE_Q: q, _EMBEDDING: emb}, meta=AdapterMeta())
    flagged = target_findings(save_adapter(both, tmp_path / "peft", format="peft"), "diffusers")
    assert set(flagged) == {"unknown-module"}  # the PEFT layout, not the embedding
