"""DoRA for `LoraLinear`: y = b + m ⊙ (W x + s·B A x) / ‖W + s·B A‖, the norm taken per output row.

PEFT's formulation (and the paper's, section 4.3): the row norm is a constant of each step,
detached from the graph, so only the magnitude m (out,) and the LoRA factors get gradients.
Written as y = b + g ⊙ u with g = m / ‖W + s·B A‖ and u the plain LoRA output without bias,
the backward pass is the LoRA one with the output gradient scaled by g, plus m's gradient
Σ_tokens grad ⊙ u / ‖·‖. One autograd node (`DoraMatmul`) does it with the frozen weight
fetched once per forward: the norm costs one (out, rank) × (rank, in) product and one pass over
the weight, small next to the matmuls over every token.

With LoRA dropout or under autocast, `autograd_forward` follows PEFT's graph op for op instead
(the dropped input needs the base matmul twice: W x for the output, W x̃ for the DoRA term).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .base_matmul import frozen_weight


class LoraLinear(Protocol):
    """What DoRA reads of `lora_layers.LoraLinear` (a protocol: that module imports this one)."""

    base_layer: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    magnitude: nn.Parameter | None
    dropout: nn.Module
    scale: float

    def drops(self) -> bool: ...
    def frozen_input_grad(self, grad: torch.Tensor) -> torch.Tensor: ...


def weight_norm(layer: LoraLinear, weight: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B A‖ per output row (out,), float32, outside the graph; `weight` as `frozen_weight` gives it."""
    device = layer.lora_A.device.type
    with torch.no_grad(), torch.autocast(device, enabled=False):  # float32 under --precision too
        if weight is None:
            weight = frozen_weight(layer.base_layer, torch.float32)
        adapted = torch.addmm(weight.float(), layer.lora_B, layer.lora_A, alpha=layer.scale)
        norm: torch.Tensor = torch.linalg.vector_norm(adapted, dim=1)
        return norm


class DoraMatmul(torch.autograd.Function):
    """y = b + g ⊙ (W x + s·B A x), g = m / ‖W + s·B A‖ (detached), for a `LoraLinear` with DoRA and no dropout."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, layer: LoraLinear
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight = frozen_weight(layer.base_layer, x.dtype)
        norm = weight_norm(layer, weight)
        h = flat.to(a.dtype) @ a.t().contiguous()
        base = F.linear(flat.to(weight.dtype), weight).to(h.dtype)
        del weight  # a dequantized or upcast copy: dropped before the output is allocated
        u = torch.addmm(base, h, b.t().contiguous(), alpha=layer.scale)
        g = magnitude.detach() / norm
        out = u * g
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            out += bias.to(out.dtype)
        ctx.save_for_backward(x, h, a, b, u, g, norm)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, h, a, b, u, g, norm = ctx.saved_tensors
        layer: LoraLinear = ctx.layer
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)
        grad_m = (grad * u).sum(0).div_(norm)
        grad_u = grad.mul(g)  # from here on, LoRA's backward with the output gradient scaled by g
        grad_h = (grad_u @ b).mul_(layer.scale)
        grad_b = (h.t() @ grad_u).mul_(layer.scale).t()
        grad_a = grad_h.t() @ x.reshape(-1, x.shape[-1]).to(h.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            shape = (*grad_out.shape[:-1], a.shape[1])
            grad_x = layer.frozen_input_grad(grad_u).to(h.dtype).addmm_(grad_h, a).view(shape).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, grad_m, None


def autograd_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward in autograd ops (each one cast by autocast when it is on); dropout on the LoRA input."""
    assert layer.magnitude is not None
    result: torch.Tensor = layer.base_layer(x)
    g = layer.magnitude / weight_norm(layer)
    dropped = layer.dropout(x)
    lora = F.linear(F.linear(dropped.to(layer.lora_A.dtype), layer.lora_A), layer.lora_B) * layer.scale
    if not layer.drops():  # W x is the base result without its bias
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias
    else:
        weight = frozen_weight(layer.base_layer, x.dtype)
        base = F.linear(dropped.to(weight.dtype), weight)
    return (result + (g - 1) * base.to(g.dtype) + g * lora).to(result.dtype)
