"""Sibling `LoraLinear`s that read the same input (q/k/v, gate/up) as one autograd node.

Each adapted linear alone casts its input to float32 for the low-rank path (forward and again in
the backward pass), runs its own skinny (tokens × rank) products, and returns its own input
gradient, which autograd then sums with its siblings'. Grouped, the input is cast once, x·Aᵀ of
all siblings is one (tokens × Σrank) product against the stacked A, the A gradients are one
product, and the input gradient of every frozen and low-rank path is summed in one float32 buffer
by a single `addmm` over the stacked A and rounded once. Each output is still base + scale · B·h,
so the numerics are those of the per-linear node (`_LoraMatmul`) up to float summation order.

Transformers calls the siblings one at a time (`self.q_proj(x)`, `self.k_proj(x)`, …), so the first
sibling called computes every sibling's output and the others take theirs from the group when they
are called with the very same tensor, unchanged (same object, version, grad mode and factor
versions). A sibling called with another input while outputs are still held (cross-attention's k/v
read the encoder's states) splits the group for good: every sibling then runs alone. DoRA, dropout, autocast and torch.compile fall back to the
per-linear forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

# Leaf names of Llama-family siblings that transformers feeds the same tensor (`inject.group_siblings`).
SIBLINGS = (frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}))


class LoraLinear(Protocol):
    """What the group reads of `lora_layers.LoraLinear` (a protocol: that module imports this one)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    magnitude: nn.Parameter | None
    scale: float

    def drops(self) -> bool: ...
    def frozen_matmul(self, x: torch.Tensor) -> torch.Tensor: ...
    def frozen_input_grad(self, grad: torch.Tensor) -> torch.Tensor: ...


class SiblingGroup:
    """`LoraLinear`s fed one input; computes all their outputs at the first call and hands out the rest."""

    def __init__(self, layers: Sequence[LoraLinear]) -> None:
        self.layers = tuple(layers)
        self._key: tuple[Any, ...] | None = None
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}
        self.split = False  # set for good once a sibling is called with another input (cross-attention)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output for `x`, or None where the group cannot run (the caller goes per-linear)."""
        key = self._key_of(x)
        if x is self._input and key == self._key and id(layer) in self._pending:
            out = self._pending.pop(id(layer))
            if not self._pending:
                self._input = self._key = None
            return out
        if self._pending:  # the last grouped outputs went unused: these siblings do not share their input
            self.split = True
            self._pending, self._input, self._key = {}, None, None
        if self.split or not self._fusable(x):
            return None
        params = [p for m in self.layers for p in (m.lora_A, m.lora_B)]
        outs = _SiblingLoraMatmul.apply(x, self, *params)  # type: ignore[no-untyped-call]
        self._pending = {id(m): o for m, o in zip(self.layers, outs, strict=True) if m is not layer}
        self._input, self._key = x, key
        return outs[self.layers.index(layer)]  # type: ignore[no-any-return]

    def _key_of(self, x: torch.Tensor) -> tuple[Any, ...]:
        versions = tuple(p._version for m in self.layers for p in (m.lora_A, m.lora_B))
        return (x._version, torch.is_grad_enabled(), versions)

    def _fusable(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
            return False
        return all(m.magnitude is None and not m.drops() for m in self.layers)


class _SiblingLoraMatmul(torch.autograd.Function):
    """yᵢ = Wᵢ x (+ biasᵢ) + scaleᵢ · Bᵢ Aᵢ x for every layer of a `SiblingGroup`, one shared x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: SiblingGroup, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a_s, b_s = params[0::2], params[1::2]
        flat = x.reshape(-1, x.shape[-1])
        stacked = torch.cat(a_s)  # (Σrank, in)
        h = flat.to(stacked.dtype) @ stacked.t().contiguous()  # one cast, one skinny product for all
        outs = []
        start = 0
        for layer, b in zip(group.layers, b_s, strict=True):
            h_i = h[:, start : start + b.shape[1]]
            start += b.shape[1]
            base = layer.frozen_matmul(flat).to(h.dtype)
            out = torch.addmm(base, h_i, b.t().contiguous(), alpha=layer.scale, out=base)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype))
        ctx.save_for_backward(x, h, stacked, *b_s)
        ctx.group = group
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        x, h, stacked, *b_s = ctx.saved_tensors
        layers: tuple[LoraLinear, ...] = ctx.group.layers
        grad_hs, grad_ps, frozen = [], [], []
        start = 0
        for layer, b, grad_out in zip(layers, b_s, grads, strict=True):
            rank = b.shape[1]
            h_i = h[:, start : start + rank]
            start += rank
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_f = grad.to(h.dtype)
            grad_hs.append((grad_f @ b).mul_(layer.scale))
            grad_ps.append((h_i.t() @ grad_f).mul_(layer.scale).t())  # B's gradient
            if ctx.needs_input_grad[0]:
                frozen.append(layer.frozen_input_grad(grad))
        grad_h = torch.cat(grad_hs, dim=1)  # (tokens, Σrank)
        flat = x.reshape(-1, x.shape[-1])
        grad_stacked = grad_h.t() @ flat.to(h.dtype)  # every A's gradient in one product
        grad_as = grad_stacked.split([b.shape[1] for b in b_s])
        grad_x = _summed_input_grad(frozen, grad_h, stacked) if frozen else None
        if grad_x is not None:
            grad_x = grad_x.view(x.shape).to(x.dtype)
        params = [g for pair in zip(grad_as, grad_ps, strict=True) for g in pair]
        return (grad_x, None, *params)


def _summed_input_grad(frozen: list[torch.Tensor], grad_h: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Σ gᵢ·Wᵢ + grad_h·A_stacked in float32: into a float32 frozen gradient where there is one, else into the
    low-rank product (a bf16 frozen gradient is then added without a cast copy of its own)."""
    own = next((i for i, f in enumerate(frozen) if f.dtype == grad_h.dtype), None)
    if own is None:
        total = grad_h @ stacked
    else:
        total = frozen.pop(own).addmm_(grad_h, stacked)
    for f in frozen:
        total.add_(f)
    return total
