"""`LoraEmbedding`: a frozen `nn.Embedding` plus PEFT's low-rank path, y = E[ids] + scale · A[:, ids]ᵀ Bᵀ.

PEFT's layout and initialisation: `lora_embedding_A` (rank, num_embeddings) starts at zero and
`lora_embedding_B` (dim, rank) normal, so the model starts at its base, the opposite of a linear
layer's zero B. The lookup keeps the base's `padding_idx` (that row of A gets no gradient), and
there is no dropout on the path, as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..info import scale_from_alpha


class LoraEmbedding(nn.Module):
    """A frozen `base_layer` and trainable `lora_A` (rank, num_embeddings), `lora_B` (dim, rank)."""

    fan_in_fan_out = False
    magnitude = None  # no DoRA on embeddings

    def __init__(
        self,
        base_layer: nn.Embedding,
        rank: int,
        alpha: float,
        *,
        rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = scale_from_alpha(alpha, rank, rslora)
        device = base_layer.weight.device
        values = torch.empty(base_layer.embedding_dim, rank)  # drawn on the CPU: the same start on any device
        nn.init.normal_(values, generator=generator)
        self.lora_A = nn.Parameter(torch.zeros(rank, base_layer.num_embeddings, device=device))
        self.lora_B = nn.Parameter(values.to(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base_layer(ids)
        after_a = F.embedding(ids, self.lora_A.t(), padding_idx=self.base_layer.padding_idx)
        return out + (after_a @ self.lora_B.t() * self.scale).to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}"
