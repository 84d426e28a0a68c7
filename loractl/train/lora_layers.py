"""`LoraLinear`: a frozen linear layer plus a trainable low-rank path, y = W x + scale · B A dropout(x).

Wraps `nn.Linear` and transformers' GPT-2 `Conv1D` (weight stored (in, out)); A is (rank, in)
and B (out, rank) for both, as in PEFT, so only a merged ΔW is ever transposed. B starts at
zero, so an injected model computes exactly what its base computes until the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..info import scale_from_alpha


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_adaptable(module: nn.Module) -> bool:
    """Whether `LoraLinear` can wrap `module`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoraLinear(nn.Module):
    """A frozen `base_layer` and trainable `lora_A` (rank, in), `lora_B` (out, rank)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base_layer(x)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        # One fused multiply-add over the flattened batch, y + scale · h Bᵀ, in the factors' float32 (as PEFT
        # adds it): no (tokens, out) temporaries for the scale and the sum; one rounding back to a bf16 base.
        base = y.reshape(-1, y.shape[-1]).to(h.dtype)
        out = torch.addmm(base, h.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scale)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return (
            f"rank={self.rank}, alpha={self.alpha}, scale={self.scale} ({rule}), fan_in_fan_out={self.fan_in_fan_out}"
        )


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
