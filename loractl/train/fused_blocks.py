"""Fused RMSNorm, SwiGLU and attention for Llama-family decoder layers: the same forward, a cheaper backward.

Eager autograd keeps two hidden-sized tensors per RMSNorm (its input and the normalised input)
and four intermediate-sized ones per gated MLP (gate, silu(gate), up and their product). These
autograd nodes keep what the backward pass needs and no more: a norm saves its input and the
per-token scale, the MLP saves gate, up and their product (silu(gate) is recomputed). On
SmolLM2-135M's shape, batch 8 × 96 tokens, that is about 250 MB less per step. The forward
arithmetic is transformers' own, op for op, so the outputs are bitwise those of the eager modules.

Llama's attention (causal, no mask, no cache: a training step) becomes one node from the projections to
the attention output: rotary embedding and SDPA's CPU flash kernel forward, op for op transformers' own
(bitwise the same output), and a backward that runs the flash kernel's backward in float32 for a bf16/fp16
model (its bf16 backward is ~1.3x slower than its float32 one on a CPU and rounds more: the gradients come out
closer to a float64 reference) and the rotary embedding's backward as g·cos plus the half-swapped g·sin
instead of autograd's graph through its multiplies, negation, slices and concatenation. On a GPU, for other
dtypes, under a mask (padding, packed rows), a cache, attention dropout, autocast or a compiler, it runs
transformers' own forward.

`fuse(model)` gives each recognised module a subclass of its own class whose `forward` is the
fused one (still an instance of the transformers class; under autocast it runs the eager forward);
other architectures are left as they are.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# transformers classes whose forward is exactly the eager code below (Gemma's (1 + w) norm is not).
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILUS = frozenset({"SiLU", "SiLUActivation"})  # torch's and transformers' (both F.silu)
ATTENTIONS = frozenset({"LlamaAttention"})  # q/k/v → rotary → SDPA → o, no sliding window, no q/k norm


def fuse(model: nn.Module) -> int:
    """Give each recognised RMSNorm and SiLU-gated MLP of `model` its fused forward; the number swapped."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if hasattr(cls, "eager_forward"):  # fused already
            continue
        if cls.__name__ in RMS_NORMS and isinstance(getattr(module, "variance_epsilon", None), float):
            module.__class__ = _fused(cls, _norm_forward)
            count += 1
        elif cls.__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILUS:
            module.__class__ = _fused(cls, _mlp_forward)
            count += 1
        elif cls.__name__ in ATTENTIONS and callable(getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb", 0)):
            module.__class__ = _fused(cls, _attention_forward)
            count += 1
    return count


_FUSED: dict[type[nn.Module], type[nn.Module]] = {}


def _fused(cls: type[nn.Module], forward: Any) -> type[nn.Module]:
    """`cls` with `forward` (made once per class, so every layer's module shares one class)."""
    if cls not in _FUSED:
        body = {"forward": forward, "eager_forward": cls.forward, "__module__": cls.__module__}
        _FUSED[cls] = type(cls.__name__, (cls,), body)
    return _FUSED[cls]


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(hidden_states.device.type):
        return self.eager_forward(hidden_states)  # type: ignore[no-any-return,operator]
    out: torch.Tensor = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)  # type: ignore[no-untyped-call]
    return out


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        return self.eager_forward(x)  # type: ignore[no-any-return,operator]
    gated: torch.Tensor = _SiluGate.apply(self.gate_proj(x), self.up_proj(x))  # type: ignore[no-untyped-call,operator]
    out: torch.Tensor = self.down_proj(gated)  # type: ignore[operator]
    return out


class _RMSNorm(torch.autograd.Function):
    """weight · (x / rms(x)), computed in float32 as transformers does; saves x and 1/rms only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(torch.float32)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a trainable norm (inject freezes them)
            grad_weight = (grad * (xf * rstd).to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        g = (grad * weight).to(torch.float32)
        # rstd · (g − x̂ · mean(g · x̂)) with x̂ = x · rstd, as rstd · g − x · rstd³ · mean(g · x): no x̂ tensor, two
        # passes fewer over (tokens, hidden) float32 (the float32 backward ≈ 1.5x faster alone)
        coef = (g * xf).mean(-1, keepdim=True).mul_(rstd.pow(3))
        grad_x = g.mul_(rstd).addcmul_(xf, coef, value=-1)
        return grad_x.to(x.dtype), grad_weight, None


class _SiluGate(torch.autograd.Function):
    """silu(gate) · up; saves gate and up (silu(gate) is recomputed in the backward pass). Each product is written
    into the tensor its first factor just made (bitwise the same values): one fresh (tokens, intermediate)
    buffer fewer in the forward and two in the backward, memory a step would otherwise page in anew."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _product(F.silu(gate), up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        gate, up = ctx.saved_tensors
        grad_up = _product(F.silu(gate), grad) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            through_up = (grad * up).to(gate.dtype)  # the gradient of silu(gate), in its dtype as autograd casts it
            grad_gate = torch.ops.aten.silu_backward.grad_input(through_up, gate, grad_input=through_up)
        return grad_gate, grad_up


def _product(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh · other, written into `fresh` (a tensor the caller just made) unless the product promotes its dtype."""
    return fresh.mul_(other) if fresh.dtype == torch.result_type(fresh, other) else fresh * other


def _attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if not _flash_applies(self, hidden_states, position_embeddings, attention_mask, kwargs):
        return self.eager_forward(hidden_states, position_embeddings, attention_mask, **kwargs)  # type: ignore[no-any-return,operator]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # type: ignore[operator]
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # type: ignore[operator]
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # type: ignore[operator]
    assert position_embeddings is not None
    cos, sin = position_embeddings
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb
    out: torch.Tensor = _CausalAttention.apply(query, key, value, cos, sin, self.scaling, rotary)  # type: ignore[no-untyped-call]
    out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), None  # type: ignore[operator]


def _flash_applies(
    module: nn.Module,
    x: torch.Tensor,
    position_embeddings: Any,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """Whether transformers would run this attention as SDPA's causal CPU flash kernel with nothing else around it."""
    dropout = module.training and bool(getattr(module, "attention_dropout", 0.0))
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.dim() == 3
        and x.shape[1] > 1
        and attention_mask is None
        and cache is None
        and position_embeddings is not None
        and not dropout
        and not kwargs.get("output_attentions")
        and getattr(module.config, "_attn_implementation", None) == "sdpa"
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # inductor fuses the rotary work itself
    )


class _CausalAttention(torch.autograd.Function):
    """softmax(rot(q) · rot(k)ᵀ · scale, causal) · v for q (batch, heads, seq, dim) and k, v with as many or fewer
    heads (grouped-query attention), rot = the model's rotary embedding; saves the rotated q, k, v, the output and
    its log-sum-exp (what SDPA's own node saves)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        scale: float,
        rotary: Any,
    ) -> torch.Tensor:
        query, key = rotary(query, key, cos, sin)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, cos, sin)
        ctx.scale = scale
        return out  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        query, key, value, out, lse, cos, sin = ctx.saved_tensors
        dtype = query.dtype
        if dtype != torch.float32:  # the float32 kernel: faster on a CPU, and no bf16 rounding inside it
            grad, query, key, value, out = (t.float() for t in (grad, query, key, value, out))
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key, value, out, lse, 0.0, True, scale=ctx.scale
        )
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (
            _rotary_backward(grad_q, cos, sin, dtype),
            _rotary_backward(grad_k, cos, sin, dtype),
            grad_v.to(dtype),
            None,
            None,
            None,
            None,
        )


def _rotary_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient through x·cos + rotate_half(x)·sin, rotate_half(x) = [-x₂, x₁]: g·cos + [(g·sin)₂, -(g·sin)₁]."""
    half = grad.shape[-1] // 2
    turned = grad * sin
    grad = grad * cos
    grad[..., :half] += turned[..., half:]
    grad[..., half:] -= turned[..., :half]
    return grad.to(dtype)
