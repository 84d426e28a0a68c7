"""`LoraLinear`: a frozen linear layer plus a trainable low-rank path, y = W x + scale · B A dropout(x).

Wraps `nn.Linear`, transformers' GPT-2 `Conv1D` (weight stored (in, out)) and bitsandbytes'
quantized linears; A is (rank, in) and B (out, rank) for all, as in PEFT, so only a merged ΔW is
ever transposed. B starts at zero, so an injected model computes exactly what its base computes
until the first step.

The layer is one autograd node (`_LoraMatmul`): the frozen matmul in the dtype `base_matmul`
picks, the low-rank term added by one fused multiply-add, and in the backward pass the input
gradient of both paths summed in place, with no weight gradient and nothing saved but the input
and the (tokens, rank) product. Where the frozen matmuls run in bf16 (a bf16 base on a CPU with bf16
units, or a GPU), the low-rank products run in bf16 too, from the float32 factors and into float32
gradients, as autocast runs PEFT's; the low-rank term is added in the frozen matmul's own epilogue
(`addmm` over bf16: float32 accumulation, one rounding), so no (tokens, features) tensor is ever
copied to float32 and back. `LORACTL_BASE_MATMUL=float32` keeps the float32 path PEFT computes
without autocast. Under autocast (`--precision`) the layer keeps autograd's own
graph, so each op runs in the dtype autocast gives it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..info import scale_from_alpha
from .base_matmul import frozen_weight, is_conv1d
from .dora import DoraMatmul, weight_norm
from .dora import autograd_forward as dora_autograd_forward


def is_adaptable(module: nn.Module) -> bool:
    """Whether `LoraLinear` can wrap `module`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoraLinear(nn.Module):
    """A frozen `base_layer` and trainable `lora_A` (rank, in), `lora_B` (out, rank); with DoRA, `magnitude` (out,)."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        *,
        rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
        dora: bool = False,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        assert isinstance(weight, torch.Tensor)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # From the layer, not the weight: a bitsandbytes 4-bit weight is packed into (n, 1) bytes.
        in_features, out_features = weight.shape if self.fan_in_fan_out else _features(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = scale_from_alpha(alpha, rank, rslora)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=torch.float32))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_a(self.lora_A, init, rank, generator)
        # DoRA's magnitude (out,): the row norms of W, so that the model starts at the base (PEFT's init).
        self.magnitude = nn.Parameter(weight_norm(self)) if dora else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.magnitude is not None:
            if torch.is_autocast_enabled(x.device.type) or self.drops():
                return dora_autograd_forward(self, x)
            dora_out: torch.Tensor = DoraMatmul.apply(x, self.lora_A, self.lora_B, self.magnitude, self)  # type: ignore[no-untyped-call]
            return dora_out
        if torch.is_autocast_enabled(x.device.type):
            return self._autograd_forward(x)
        dropped = self.dropout(x) if self.drops() else None
        out: torch.Tensor = _LoraMatmul.apply(x, dropped, self.lora_A, self.lora_B, self)  # type: ignore[no-untyped-call]
        return out

    def drops(self) -> bool:
        """Whether this forward applies dropout to the LoRA input."""
        return self.training and not isinstance(self.dropout, nn.Identity)

    def frozen_input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad · W for the flattened output gradient, in the base's matmul dtype (no weight gradient)."""
        weight = frozen_weight(self.base_layer, grad.dtype)
        return grad.to(weight.dtype) @ weight

    def _autograd_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain graph (autocast casts each op): the base layer's own forward plus the low-rank term."""
        y: torch.Tensor = self.base_layer(x)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        base = y.reshape(-1, y.shape[-1]).to(h.dtype)
        out = torch.addmm(base, h.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scale)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        dora = ", dora=True" if self.magnitude is not None else ""
        return (
            f"rank={self.rank}, alpha={self.alpha}, scale={self.scale} ({rule}), fan_in_fan_out={self.fan_in_fan_out}"
            f"{dora}"
        )


class _LoraMatmul(torch.autograd.Function):
    """y = W x (+ bias) + scale · B A x̃ (x̃ = dropout(x), or x itself), for a `LoraLinear`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dropped: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, layer: LoraLinear
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        lora_in = flat if dropped is None else dropped.reshape(flat.shape)
        weight = frozen_weight(layer.base_layer, x.dtype)
        if weight.dtype == x.dtype == torch.bfloat16:
            out, h = _bf16_forward(flat, lora_in, weight, a, b, layer)
        else:
            # Aᵀ and Bᵀ as contiguous copies (rank × features, tiny): BLAS runs the skinny products ~1.5x faster.
            h = lora_in.to(a.dtype) @ a.t().contiguous()
            base = _linear(flat.to(weight.dtype), weight, layer).to(h.dtype)
            # into the fresh base output in place; `out=` rather than `addmm_`, which torch's FLOP counter skips
            out = torch.addmm(base, h, b.t().contiguous(), alpha=layer.scale, out=base)
        ctx.save_for_backward(x if dropped is None else dropped, h, a, b)
        ctx.layer, ctx.dropped, ctx.x_dtype = layer, dropped is not None, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        lora_in, h, a, b = ctx.saved_tensors
        layer: LoraLinear = ctx.layer
        wants_x, wants_dropped = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        lora_in = lora_in.reshape(-1, lora_in.shape[-1])
        shape = (*grad_out.shape[:-1], a.shape[1])
        if h.dtype == torch.bfloat16:
            grad_a, grad_b, grad_x, grad_dropped = _bf16_backward(grad, lora_in, h, a, b, layer, ctx)
            return _shaped(grad_x, shape), _shaped(grad_dropped, shape), grad_a, grad_b, None
        grad_f = grad.to(h.dtype)
        grad_h = (grad_f @ b).mul_(layer.scale)  # (tokens, rank)
        grad_b = (h.t() @ grad_f).mul_(layer.scale).t()  # hᵀ·g is the fast order; its transpose is B's layout
        grad_a = grad_h.t() @ lora_in.to(h.dtype)
        grad_x = grad_dropped = None
        if ctx.dropped:
            grad_dropped = (grad_h @ a).view(shape).to(ctx.x_dtype) if wants_dropped else None
            if wants_x:
                grad_x = layer.frozen_input_grad(grad).view(shape).to(ctx.x_dtype)
        elif wants_x:
            grad_x = layer.frozen_input_grad(grad).to(h.dtype).addmm_(grad_h, a).view(shape).to(ctx.x_dtype)
        return grad_x, grad_dropped, grad_a, grad_b, None


def _linear(x: torch.Tensor, weight: torch.Tensor, layer: LoraLinear) -> torch.Tensor:
    """x · Wᵀ (+ the base layer's bias) in `weight`'s dtype."""
    bias = getattr(layer.base_layer, "bias", None)
    return F.linear(x, weight, None if bias is None else bias.to(weight.dtype))


def _bf16_forward(
    x: torch.Tensor, lora_in: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer: LoraLinear
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) for a base whose matmuls run in bf16: the low-rank products in bf16 from the float32 factors (as
    autocast runs PEFT's), and the low-rank term (+ bias) added by the frozen matmul's own epilogue, accumulated
    in float32 and rounded once: no float32 copy of any (tokens, features) tensor."""
    h = lora_in @ a.to(torch.bfloat16).t()
    bias = getattr(layer.base_layer, "bias", None)
    scaled_b = b.mul(layer.scale).to(torch.bfloat16).t()
    term = h @ scaled_b if bias is None else torch.addmm(bias.to(torch.bfloat16), h, scaled_b)
    return torch.addmm(term, x, weight.t(), out=term), h  # out= the term: no copy of it into a new output


def _bf16_backward(
    grad: torch.Tensor,
    lora_in: torch.Tensor,
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    layer: LoraLinear,
    ctx: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad A, grad B, grad x, grad of the dropout output) of `_bf16_forward`: bf16 products, float32 factor
    gradients, the low-rank input gradient added in the frozen matmul's epilogue (or returned alone under dropout)."""
    wants_x, wants_dropped = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    a16 = a.to(torch.bfloat16)
    grad_h = grad @ b.mul(layer.scale).to(torch.bfloat16)  # (tokens, rank)
    grad_b = (h.t() @ grad).to(torch.float32).mul_(layer.scale).t()
    grad_a = (grad_h.t() @ lora_in).to(torch.float32)
    grad_x = grad_dropped = None
    if ctx.dropped:
        grad_dropped = grad_h @ a16 if wants_dropped else None
        grad_x = layer.frozen_input_grad(grad) if wants_x else None
    elif wants_x:
        low_rank = grad_h @ a16
        grad_x = torch.addmm(low_rank, grad, frozen_weight(layer.base_layer, grad.dtype), out=low_rank)
    return grad_a, grad_b, grad_x, grad_dropped


def _shaped(grad: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    return None if grad is None else grad.view(shape)


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer, plain or bitsandbytes-quantized (both keep `in_features`, `out_features`)."""
    return int(layer.in_features), int(layer.out_features)  # type: ignore[arg-type]


def _init_a(a: torch.Tensor, init: str, rank: int, generator: torch.Generator | None) -> None:
    """PEFT's default (kaiming-uniform, a=√5) or the paper's gaussian (std 1/r), from `generator`."""
    values = torch.empty(a.shape)  # on the CPU, so a CPU generator seeds any device the same way
    if init == "gaussian":
        nn.init.normal_(values, 0.0, 1.0 / rank, generator=generator)
    else:
        nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        a.copy_(values)
