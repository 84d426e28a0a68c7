"""Grouped sibling LoRA (q/k/v, gate/up as one node) against the per-linear node, and its fallbacks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from loractl.train import LoraLinear
from loractl.train.inject import group_siblings
from loractl.train.sibling_lora import SiblingGroup

pytestmark = pytest.mark.usefixtures("one_thread")


def attention(dtype: torch.dtype, bias: bool = False) -> nn.Module:
    """q/k/v of one input (k, v narrower, as with grouped-query attention) and an o_proj that is no sibling."""
    torch.manual_seed(0)
    shapes = OrderedDict(q_proj=(24, 24), k_proj=(24, 8), v_proj=(24, 8), o_proj=(24, 24))
    return nn.ModuleDict({n: nn.Linear(i, o, bias=bias).to(dtype) for n, (i, o) in shapes.items()})


def adapted(dtype: torch.dtype, bias: bool = False, **kwargs: object) -> nn.ModuleDict:
    model = attention(dtype, bias)
    generator = torch.Generator().manual_seed(3)
    for name, layer in list(model.items()):
        model[name] = LoraLinear(layer, 4, 8.0, generator=generator, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            model[name].lora_B.normal_(generator=generator)
    return model  # type: ignore[return-value]


def run(model: nn.ModuleDict, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """q, k, v outputs (called one at a time, as transformers does) and every gradient after a weighted sum."""
    x = x.detach().requires_grad_(True)
    outs = [model[n](x) for n in ("q_proj", "k_proj", "v_proj")]
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    params = [p for n in ("q_proj", "k_proj", "v_proj") for p in (model[n].lora_A, model[n].lora_B)]
    return [o.detach().float() for o in outs], [x.grad.float(), *(p.grad for p in params)]  # type: ignore[union-attr]


@pytest.mark.parametrize(("dtype", "bias", "tol"), [(torch.float32, True, 1e-5), (torch.bfloat16, False, 2e-2)])
def test_grouped_node_gives_the_per_linear_outputs_and_gradients(dtype: torch.dtype, bias: bool, tol: float) -> None:
    x = torch.randn(2, 5, 24).to(dtype)
    alone, grouped = adapted(dtype, bias), adapted(dtype, bias)
    assert group_siblings(grouped) == 1
    assert grouped["o_proj"].siblings is None and grouped["q_proj"].siblings is grouped["v_proj"].siblings
    outs_alone, grads_alone = run(alone, x)
    outs_grouped, grads_grouped = run(grouped, x)
    for ours, theirs in zip(outs_grouped + grads_grouped, outs_alone + grads_alone, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item())


def test_siblings_take_their_outputs_from_one_grouped_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted(torch.float32)
    group_siblings(model)
    calls = []
    real = SiblingGroup._fusable
    monkeypatch.setattr(SiblingGroup, "_fusable", lambda self, x: calls.append(1) or real(self, x))
    x = torch.randn(3, 24)
    [model[n](x) for n in ("q_proj", "k_proj", "v_proj")]
    assert len(calls) == 1  # k and v came from q's call
    model["k_proj"](x.clone())  # another tensor: computed anew, not a stale output
    assert len(calls) == 2
    with torch.no_grad():
        model["v_proj"].lora_B.add_(1.0)  # an optimizer step between calls invalidates the held outputs
    torch.testing.assert_close(model["v_proj"](x), model["v_proj"].own_forward(x))


def test_siblings_fed_different_inputs_split_for_good() -> None:
    model = adapted(torch.float32)
    group = SiblingGroup([model[n] for n in ("q_proj", "k_proj", "v_proj")])
    for n in ("q_proj", "k_proj", "v_proj"):
        model[n].siblings = group
    x, memory = torch.randn(3, 24), torch.randn(5, 24)
    q = model["q_proj"](x)  # cross-attention: q reads x, k and v the encoder's memory
    k, v = model["k_proj"](memory), model["v_proj"](memory)
    assert group.split
    for n, out, inp in (("q_proj", q, x), ("k_proj", k, memory), ("v_proj", v, memory)):
        torch.testing.assert_close(out, model[n].own_forward(inp))


@pytest.mark.parametrize("kwargs", [{"dora": True}, {"dropout": 0.5}])
def test_dora_and_dropout_fall_back_per_linear(kwargs: dict[str, object]) -> None:
    model = adapted(torch.float32, **kwargs)
    group_siblings(model)
    x = torch.randn(3, 24)
    model.eval()  # dropout off in eval: the group runs; DoRA never groups
    grouped_runs = not kwargs.get("dora")
    q = model["q_proj"]
    assert (q.siblings._fusable(x)) is grouped_runs  # type: ignore[union-attr]
    model.train()
    assert q.siblings._fusable(x) is False  # type: ignore[union-attr]
    torch.manual_seed(5)  # the same dropout mask both ways
    ours = q(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours, q.own_forward(x))
