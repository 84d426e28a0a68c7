"""LoraLinear against PEFT's LoRA layer and a dense reference; injection rules."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from loractl.errors import UsageError
from loractl.train import LoraLinear, TrainConfig, adapter_from_model, inject

peft = pytest.importorskip("peft")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(conv1d: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = (lambda i, o: pytorch_utils.Conv1D(o, i)) if conv1d else (lambda i, o: nn.Linear(i, o))
    return nn.Sequential(OrderedDict(fc1=layer(12, 20), act=nn.Tanh(), fc2=layer(20, 7)))


def peft_twin(model: nn.Module, config: TrainConfig, conv1d: bool) -> nn.Module:
    """PEFT's LoRA on a copy of `model`, with non-zero B, and loractl's layers holding the same factors."""
    lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, use_rslora=config.rslora,
                           target_modules=["fc1", "fc2"], init_lora_weights=False, fan_in_fan_out=conv1d)  # fmt: skip
    torch.manual_seed(1)
    twin = peft.get_peft_model(copy.deepcopy(model), lora)
    inject(model, config)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            theirs = twin.base_model.model.get_submodule(name)
            ours = model.get_submodule(name)
            ours.lora_A.copy_(theirs.lora_A["default"].weight)
            ours.lora_B.copy_(theirs.lora_B["default"].weight)
    return twin


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_peft(conv1d: bool, rslora: bool) -> None:
    model = mlp(conv1d)
    config = TrainConfig(rank=4, alpha=6.0, rslora=rslora, targets=("fc1", "fc2"))
    twin = peft_twin(model, config, conv1d)
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = model(x_ours), twin(x_theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (ours**2).sum().backward()
    (theirs**2).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    for name in ("fc1", "fc2"):
        mine, peers = model.get_submodule(name), twin.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.lora_A.grad, peers.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.lora_B.grad, peers.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)
        assert mine.scale == twin.base_model.model.get_submodule(name).scaling["default"]


def test_forward_matches_dense_reference() -> None:
    torch.manual_seed(0)  # the layers' own initialisation
    base = nn.Linear(10, 6)
    layer = LoraLinear(copy.deepcopy(base), rank=3, alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    delta = (5.0 / 3) * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ (base.weight + delta).T + base.bias)


def test_starts_exactly_at_the_base() -> None:
    model = mlp()
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    before = model(x)
    inject(model, TrainConfig(targets=("fc1", "fc2"), dropout=0.5))
    model.train()
    assert torch.equal(model(x), before)  # B = 0, and dropout touches the LoRA path only


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initialization_is_seeded_and_has_the_right_spread(init: str) -> None:
    def a_of(seed: int) -> torch.Tensor:
        model = nn.Sequential(OrderedDict(fc=nn.Linear(400, 400)))
        inject(model, TrainConfig(rank=16, targets=("fc",), init=init, seed=seed))  # type: ignore[arg-type]
        return model.fc.lora_A.detach()

    a = a_of(0)
    assert torch.equal(a, a_of(0)) and not torch.equal(a, a_of(1))
    if init == "kaiming":  # kaiming_uniform(a=√5): U(-1/√in, 1/√in)
        bound = 1 / math.sqrt(400)
        assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    else:
        assert abs(a.std().item() - 1 / 16) < 0.005


def test_rslora_scale() -> None:
    layer = LoraLinear(nn.Linear(4, 4), rank=16, alpha=8.0, rslora=True)
    assert layer.scale == 2.0


def test_inject_freezes_everything_but_lora() -> None:
    model = mlp()
    injection = inject(model, TrainConfig(rank=2, targets=("fc1",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_A", "fc1.lora_B"}
    assert injection.modules == ("fc1",)
    assert injection.trainable == 2 * 12 + 20 * 2
    assert injection.total == sum(p.numel() for p in model.parameters())


def test_targets_regex_and_exclude() -> None:
    model = mlp()
    assert inject(copy.deepcopy(model), TrainConfig(targets=r"fc\d")).modules == ("fc1", "fc2")
    assert inject(copy.deepcopy(model), TrainConfig(targets=r"fc\d", exclude=("fc2",))).modules == ("fc1",)


@pytest.mark.parametrize(
    ("targets", "message"),
    [(("fc1", "fc9"), "target 'fc9' matches no linear layer"), ("nothing.*", "matches no linear layer"),
     ("fc[", "not a valid regex")],
)  # fmt: skip
def test_pattern_matching_nothing_is_an_error(targets: tuple[str, ...] | str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        inject(mlp(), TrainConfig(targets=targets))
    assert info.value.hint is None or "fc1" in info.value.hint


def test_injecting_twice_is_refused() -> None:
    model = mlp()
    inject(model, TrainConfig(targets=("fc1",)))
    with pytest.raises(UsageError, match="already has LoRA layers"):
        inject(model, TrainConfig(targets=("fc2",)))


def test_extract_adapter_copies_factors_and_scale() -> None:
    model = mlp(conv1d=True)
    inject(model, TrainConfig(rank=2, alpha=3.0, targets=("fc1", "fc2")))
    adapter = adapter_from_model(model)
    assert set(adapter.modules) == {"fc1", "fc2"}
    m = adapter.modules["fc1"]
    assert m.fan_in_fan_out and m.scale == 1.5 and m.alpha == 3.0
    assert torch.equal(m.A, model.fc1.lora_A.detach())
    assert m.A.data_ptr() != model.fc1.lora_A.data_ptr()
    assert m.delta_weight().shape == model.fc1.base_layer.weight.shape  # Conv1D layout (in, out)
