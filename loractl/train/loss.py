"""Summed token cross-entropy of a causal LM, with a fused head + loss that never holds all logits.

The float32 logits (tokens, vocab) are the largest tensor of a small model's step (PERF.md) and
the log-softmax around them is memory-bound work. For architectures whose logits are exactly
`lm_head(base_model(...))` and whose head is frozen, `linear_cross_entropy` computes the loss
and the gradient for the hidden states chunk by chunk in the forward pass, one (chunk, vocab)
buffer instead of several (tokens, vocab) tensors, and only at the positions that carry a label:
chat data whose prompts take no loss, and padding, cost the head nothing (a full head computes
every position's logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base_matmul import matmul_dtype
from .data import IGNORE

# model_type values whose CausalLM computes logits = lm_head(base_model(...)[0]), with no scaling or capping.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
CHUNK_TOKENS = 256  # (256, 49,152) float32 logits: 50 MB, the largest buffer of a SmolLM2 step


class CausalLMLoss(nn.Module):
    """`module`'s summed cross-entropy over label tokens: forward(input_ids, labels, attention_mask)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module  # named `module` so `export.unwrap` finds the user's model inside
        config = getattr(module, "config", None)
        self.extra = {"use_cache": False} if hasattr(config, "use_cache") else {}
        self.head = _fusable_head(module, getattr(config, "model_type", None))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids, **self.extra}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:  # packed rows: transformers restarts attention where positions restart
            kwargs["position_ids"] = position_ids
        # Shift the labels, not the logits: no copy of the (batch, seq, vocab) tensor.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()
        if self.head is not None:
            hidden = self.module.base_model(**kwargs)[0].flatten(0, 1)  # type: ignore[operator]
            return linear_cross_entropy(hidden, self.head.weight, targets)
        out = self.module(**kwargs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE, reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy(hidden @ weightᵀ, targets) over targets ≠ IGNORE; hidden (tokens, dim), weight (vocab, dim).

    `weight` gets no gradient (it must be frozen); `hidden` does, computed during the forward pass.
    """
    grad_wanted = hidden.requires_grad and torch.is_grad_enabled()
    out: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, targets, grad_wanted)  # type: ignore[no-untyped-call]
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_wanted: bool) -> Any:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if grad_wanted else None  # positions without a label: zero gradient
        # A bf16 head multiplies in float32 where bf16 matmuls are slow (base_matmul): one transient copy.
        weight = weight.to(matmul_dtype(weight.dtype, weight.device, weight.shape))
        labelled = (targets != IGNORE).nonzero().squeeze(1)  # the head's work: label positions only
        # One float32 logits buffer (and one in the weight's dtype) for every chunk: a fresh (chunk, vocab) tensor
        # is above glibc's mmap threshold, and the page faults of mapping it again cost half a bf16 head matmul.
        chunk = min(CHUNK_TOKENS, len(labelled))
        buffer = torch.empty(chunk, weight.shape[0], dtype=torch.float32, device=hidden.device)
        narrow = buffer if weight.dtype == torch.float32 else torch.empty_like(buffer, dtype=weight.dtype)
        for start in range(0, len(labelled), CHUNK_TOKENS):
            rows = labelled[start : start + CHUNK_TOKENS]
            h, t = hidden[rows].to(weight.dtype), targets[rows]
            logits = buffer[: len(rows)]
            products = narrow[: len(rows)]
            torch.mm(h, weight.t(), out=products)
            if products is not logits:
                logits.copy_(products)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp and softmax in place, in the one (chunk, vocab) buffer
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=1, keepdim=True)
            lse = (sums.log() + top).squeeze(1)
            total += (lse - picked).sum()
            if grad is not None:
                probs.div_(sums)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if products is not logits:
                    probs = products.copy_(probs)
                grad[rows] = (probs @ weight).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def _fusable_head(module: nn.Module, model_type: str | None) -> nn.Linear | None:
    """The frozen, bias-free output head of a known architecture, or None to take the plain path."""
    getter = getattr(module, "get_output_embeddings", None)
    head = getter() if callable(getter) and model_type in FUSED_MODEL_TYPES else None
    body = getattr(module, "base_model", None)
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    return head if isinstance(body, nn.Module) and body is not module else None
