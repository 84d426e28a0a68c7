"""PEFT as the independent reference.

PEFT saves an adapter; loractl must read every module's ΔW as PEFT's `get_delta_weight` computes it.
loractl writes it back; PEFT must load that file onto a fresh copy of the base with no missing or
unexpected keys and give the same logits as the model PEFT trained. PEFT injects into the model
object it is given, so every load gets its own fresh base.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fixtures.make_fixtures import tiny_llama_config
from loractl.formats import describe_adapter, load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import load_peft_weights, set_peft_model_state_dict  # noqa: E402

PREFIX = "base_model.model."


@dataclass
class Case:
    """A base model factory, its input, and the LoRA config PEFT trains on it."""

    make_base: Callable[[], nn.Module]
    inputs: dict[str, torch.Tensor]
    lora: dict[str, Any]


class TinyConvNet(nn.Module):
    """A non-transformers model: PEFT's Conv2d LoRA (4-D A/B) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _llama(**overrides: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        config = tiny_llama_config()
        for k, v in overrides.items():
            setattr(config, k, v)
        return transformers.LlamaForCausalLM(config)

    return make


def _gpt2_seqcls() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0
    )
    return transformers.GPT2ForSequenceClassification(config)


TOKENS = {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1]])}
CASES = {
    "patterns": Case(
        _llama(),
        TOKENS,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
            rank_pattern={"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 3},
            alpha_pattern={"o_proj": 3, r"model\.layers\.1\.self_attn\.q_proj": 0.1},
        ),
    ),
    "rslora": Case(
        _llama(),
        TOKENS,
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear", rank_pattern={"up_proj": 3}),
    ),
    "dora": Case(_llama(), TOKENS, dict(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"])),
    "lora_bias": Case(
        _llama(attention_bias=True),
        TOKENS,
        dict(r=4, lora_alpha=8, lora_bias=True, bias="lora_only", target_modules=["q_proj", "v_proj"]),
    ),
    "modules_to_save": Case(
        _llama(), TOKENS, dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ),
    "embedding": Case(_llama(), TOKENS, dict(r=4, lora_alpha=6, target_modules=["embed_tokens", "v_proj"])),
    "gpt2_fan_in_fan_out_seqcls": Case(
        _gpt2_seqcls,
        {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 12]])},
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="SEQ_CLS"),
    ),
    "conv": Case(
        TinyConvNet,
        {"x": torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))},
        dict(r=2, lora_alpha=3, target_modules=["conv", "head"]),
    ),
}


def _fresh(base: nn.Module) -> nn.Module:
    """A copy of the base: PEFT injects into (mutates) the model it is given."""
    return copy.deepcopy(base).eval()


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, nn.Module, Any, Path]]:
    """For each case: the base weights, PEFT's model with non-trivial adapter weights, and its saved dir."""
    out = {}
    for i, (name, case) in enumerate(CASES.items()):
        torch.manual_seed(i)
        base = case.make_base().eval()
        model = get_peft_model(_fresh(base), LoraConfig(init_lora_weights=False, **case.lora))
        with torch.no_grad():  # move every trainable tensor off its init (DoRA norms, zero biases, head copies)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        model.eval()
        path = tmp_path_factory.mktemp(name) / "peft"
        model.save_pretrained(path)
        out[name] = (case, base, model, path)
    return out


def _lora_layers(model: Any) -> dict[str, LoraLayer]:
    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("name", list(CASES))
def test_delta_weights_match_peft(trained: dict[str, Any], name: str) -> None:
    case, _, model, path = trained[name]
    adapter = load_adapter(path)
    layers = _lora_layers(model)
    assert sorted(adapter.modules) == sorted(layers) and layers
    assert adapter.warnings == ()
    for module, layer in layers.items():
        m = adapter.modules[module]
        want = layer.get_delta_weight("default")
        got = m.delta_weight()
        assert got.shape == want.shape, module
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6, msg=module)
        assert m.scale == layer.scaling["default"], module
        assert m.fan_in_fan_out == bool(getattr(layer, "fan_in_fan_out", False)), module
        if case.lora.get("use_dora"):
            assert m.magnitude is not None
            assert torch.equal(m.magnitude, layer.lora_magnitude_vector["default"].weight), module
        if case.lora.get("lora_bias"):
            assert m.bias is not None and torch.equal(m.bias, layer.lora_B["default"].bias), module


def test_full_tensors_match_peft(trained: dict[str, Any]) -> None:
    _, _, model, path = trained["lora_bias"]  # bias="lora_only": the base layers' biases travel as full tensors
    biases = load_adapter(path).full_tensors
    assert len(biases) == 4
    for key, t in biases.items():
        assert torch.equal(t, model.base_model.model.get_parameter(key)), key
    _, _, model, path = trained["modules_to_save"]
    head = load_adapter(path).full_tensors
    assert list(head) == ["lm_head.weight"]
    assert torch.equal(head["lm_head.weight"], model.base_model.model.lm_head.modules_to_save["default"].weight)
    _, _, model, path = trained["gpt2_fan_in_fan_out_seqcls"]
    score = load_adapter(path).full_tensors
    assert list(score) == ["score.weight"]  # the implicit SEQ_CLS head, although modules_to_save is null
    assert torch.equal(score["score.weight"], model.base_model.model.score.modules_to_save["default"].weight)
    assert describe_adapter(path).findings == ()


def _load_in_peft(base: nn.Module, path: Path) -> Any:
    """PeftModel.from_pretrained on a fresh base; fails on missing or unexpected adapter keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(_fresh(base), path)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    # Load the same weights again, as from_pretrained did, to see what it only warns about.
    result = set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_loractl_written_adapter_loads_in_peft_with_the_same_outputs(
    trained: dict[str, Any], name: str, tmp_path: Path
) -> None:
    case, base, model, path = trained[name]
    adapter = load_adapter(path)
    save_adapter(adapter, tmp_path / "loractl")
    reloaded = _load_in_peft(base, tmp_path / "loractl")
    want = _output(model, case.inputs)
    assert not torch.allclose(want, _output(base, case.inputs), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(_output(reloaded, case.inputs), want, rtol=1e-5, atol=1e-5)
    assert load_adapter(tmp_path / "loractl").content_hash() == adapter.content_hash()


# --- a file other tools wrote -------------------------------------------------------------------

REAL = "peft-gpt2-seqcls-fanin"


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_real_gpt2_adapter_reads_as_documented(real_adapters: Path, tmp_path: Path) -> None:
    src = real_adapters / REAL
    before = _digest(src)
    info = describe_adapter(src)
    assert info.findings == ()
    adapter = load_adapter(src)
    assert sorted(adapter.modules) == sorted(f"transformer.h.{i}.attn.c_attn" for i in range(12))
    for m in adapter.modules.values():
        assert (m.rank, m.scale, m.fan_in_fan_out, m.kind) == (8, 1.0, True, "linear")
        assert m.A.shape == (8, 768) and m.B.shape == (2304, 8) and m.delta_weight().shape == (768, 2304)
    assert {k: tuple(t.shape) for k, t in adapter.full_tensors.items()} == {"score.weight": (6, 768)}
    save_adapter(adapter, tmp_path / "out")
    again = load_adapter(tmp_path / "out")
    assert again.content_hash() == adapter.content_hash() == again.meta.recorded_hash
    assert describe_adapter(tmp_path / "out").findings == ()
    assert _digest(src) == before


def _gpt2_768() -> nn.Module:
    """GPT-2 small's attention and head dims (what the adapter touches) with a tiny vocabulary and MLP."""
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=768, n_layer=12, n_head=12, n_inner=8, num_labels=6,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(config)


def test_real_gpt2_adapter_and_loractls_copy_load_in_peft_alike(real_adapters: Path, tmp_path: Path) -> None:
    src = real_adapters / REAL
    save_adapter(load_adapter(src), tmp_path / "out")
    torch.manual_seed(0)
    base = _gpt2_768().eval()
    inputs = {"input_ids": torch.tensor([[5, 17, 42, 9, 3, 12]])}
    original = _load_in_peft(base, src)
    assert len(_lora_layers(original)) == 12
    ours = _load_in_peft(base, tmp_path / "out")
    adapter = load_adapter(src)
    for module, layer in _lora_layers(original).items():
        torch.testing.assert_close(adapter.modules[module].delta_weight(), layer.get_delta_weight("default"))
    torch.testing.assert_close(_output(ours, inputs), _output(original, inputs), rtol=0, atol=0)
