"""PiSSA and OLoRA: LoRA factors taken from the base weight, the base left as the residual W − s·B₀A₀.

PEFT's `init_lora_weights="pissa"` (the top r singular triplets, √S split between A and B, divided
by the scale; `pissa_niter_N`: torch's randomized `svd_lowrank` with N subspace iterations) and
`"olora"` (the first r columns of Q and rows of R of W = QR), computed in float32 and the residual
stored back in the weight's dtype, so that the model starts where the base is (exactly for a
float32 base, to the residual's rounding for bf16/fp16, as in PEFT).

The trained adapter only holds on the residual. Written out it becomes what PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)` writes: ΔW = s(B A − B₀A₀)
= s·[B | −B₀][A ; A₀], an ordinary LoRA of rank 2r on the unmodified base (`converted_factors`).
The starting factors are kept on the layer for that (`lora_A0`, `lora_B0`, not saved in checkpoints:
a resumed run recomputes them from the base, deterministically).
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from .config import NITER
from .lora_embedding import LoraEmbedding
from .lora_layers import LoraLinear


def residual_init_(layer: LoraLinear, init: str, name: str) -> None:
    """Set A₀, B₀ from the base weight and the weight to W − s·B₀A₀ (in place; pissa_niter draws from torch's RNG)."""
    weight = layer.base_layer.weight
    assert isinstance(weight, torch.Tensor)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UsageError(
            f"--init {init} needs a float base weight, but {name!r} holds {weight.dtype}",
            hint="train the base in bf16 or fp32 (PEFT: initialise in float, then quantize the residual model)",
        )
    w = weight.detach().to(torch.float32)
    w = w.t() if layer.fan_in_fan_out else w  # (out, in)
    if layer.rank > min(w.shape):
        raise UsageError(f"--init {init}: rank {layer.rank} exceeds {name!r}'s {tuple(w.shape)} weight",
                         hint=f"use --rank {min(w.shape)} or less")  # fmt: skip
    a, b = _olora(w, layer.rank) if init == "olora" else _pissa(w, layer.rank, layer.scale, init)
    residual = torch.addmm(w, b, a, alpha=-layer.scale)
    with torch.no_grad():
        weight.copy_(residual.t() if layer.fan_in_fan_out else residual)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    layer.register_buffer("lora_A0", a.clone(), persistent=False)
    layer.register_buffer("lora_B0", b.clone(), persistent=False)


def _pissa(w: torch.Tensor, rank: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A = √(S/s) Uᵀ (rank, in), B = V √(S/s) (out, rank) from the top `rank` singular triplets of `w`."""
    niter = NITER.fullmatch(init)
    if niter is None:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :rank], s[:rank], uh[:rank]
    else:
        v, s, u = torch.svd_lowrank(w, rank, niter=int(niter.group(1)))
        uh = u.t()
    root = torch.sqrt(s / scale)
    return root[:, None] * uh, v * root


def _olora(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = R[:rank] (rank, in), B = Q[:, :rank] (out, rank) of w = QR."""
    q, r = torch.linalg.qr(w)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def converted_factors(layer: LoraLinear | LoraEmbedding) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """[A ; A₀] (2r, in), [B | −B₀] (out, 2r) and the alpha keeping the scale at 2r; None without a residual init."""
    a0, b0 = getattr(layer, "lora_A0", None), getattr(layer, "lora_B0", None)
    if not isinstance(a0, torch.Tensor) or not isinstance(b0, torch.Tensor):
        return None
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    alpha = layer.alpha * (math.sqrt(2) if layer.rslora else 2)  # PEFT's rule: s = 2α/2r, or α√2/√(2r) with rsLoRA
    return torch.cat([a, a0.to(a.device)]), torch.cat([b, -b0.to(b.device)], dim=1), float(alpha)
