"""From a model with `LoraLinear` layers to the canonical `Adapter` (and from an adapter back)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, AdapterMeta, LoraModule
from ..io.checkpoint import FingerprintViews, feed_fingerprint
from ..io.safetensors_header import TensorInfo
from ..io.tensor_bytes import dtype_code
from .base import is_quantized
from .lora_embedding import LoraEmbedding
from .lora_init import converted_factors
from .lora_layers import LoraLinear
from .saved_modules import full_tensors

_FSDP_WRAPPED = "_fsdp_wrapped_module."  # what FSDP puts into the paths of the layers it wraps


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel (or FSDP) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every `LoraLinear` by its module path (the base layer's own path, without FSDP's wrapper names)."""
    return {
        name.replace(_FSDP_WRAPPED, ""): m for name, m in unwrap(model).named_modules() if isinstance(m, LoraLinear)
    }


def adapted_layers(model: nn.Module) -> list[tuple[str, LoraLinear | LoraEmbedding]]:
    """Every LoRA layer, linear or embedding, with its module path, sorted by path."""
    layers: dict[str, LoraLinear | LoraEmbedding] = dict(lora_layers(model))
    layers.update({name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoraEmbedding)})
    return sorted(layers.items())


def adapter_from_model(model: nn.Module, *, base_model: str | None = None, task_type: str | None = None) -> Adapter:
    """A canonical adapter holding copies of the model's LoRA factors (float32, on the CPU)."""
    modules = {name: lora_module(layer) for name, layer in adapted_layers(model)}
    meta = AdapterMeta(
        base_model=base_model,
        base_fingerprint=base_fingerprint(model),
        base_views=base_views(model),
        task_type=task_type,
    )
    return Adapter(modules=modules, full_tensors=full_tensors(unwrap(model)), meta=meta)


def lora_module(layer: LoraLinear | LoraEmbedding) -> LoraModule:
    """A copy of one layer's factors as a canonical `LoraModule` (after PiSSA/OLoRA: the rank-2r LoRA on the
    unmodified base, `lora_init.converted_factors`)."""
    a, b, alpha = converted_factors(layer) or (layer.lora_A.detach(), layer.lora_B.detach(), layer.alpha)
    return LoraModule(
        A=a.to("cpu", copy=True),
        B=b.to("cpu", copy=True),
        scale=layer.scale,
        alpha=alpha,
        scale_rule="alpha/sqrt(r)" if layer.rslora else "alpha/r",
        fan_in_fan_out=layer.fan_in_fan_out,
        kind="embedding" if isinstance(layer, LoraEmbedding) else "linear",
        magnitude=None if layer.magnitude is None else layer.magnitude.detach().to("cpu", copy=True),
    )


def base_views(model: nn.Module) -> dict[str, str]:
    """`base_fingerprint` as if the base were cast to bf16 and fp16: a cast copy of the base is recognised.

    Empty for a quantized base or a residual one (`train_adapter` takes the views from the files instead).
    """
    layers = adapted_layers(model)
    if not _holds_the_base(layers):
        return {}
    views = FingerprintViews()
    for name, layer in layers:
        weight = layer.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        views.feed(f"{name}.weight", weight.detach().cpu())
    return views.digests()


def base_fingerprint(model: nn.Module) -> str | None:
    """sha256 over the adapted base weights, byte-compatible with `Checkpoint.fingerprint`.

    The weight of module `m` is hashed under the name `m.weight`, as a checkpoint stores it, so a
    fingerprint taken here equals the one `validate --base` computes from the files. None for a
    quantized base (its packed bytes are no checkpoint's) or after PiSSA/OLoRA (the weights are the residual):
    `train_adapter` hashes the files instead.
    """
    layers = adapted_layers(model)
    if not _holds_the_base(layers):
        return None
    h = hashlib.sha256()
    for name, layer in layers:
        feed_base_weight(h, name, layer)
    return "sha256:" + h.hexdigest()


def feed_base_weight(h: Any, name: str, layer: LoraLinear | LoraEmbedding) -> None:
    """Feed the weight under `layer` to fingerprint `h` as the checkpoint tensor `name.weight`."""
    weight = layer.base_layer.weight
    assert isinstance(weight, torch.Tensor)
    # A copy: `.numpy()` pins a storage for good, and FSDP must free its gathered weights afterwards.
    raw = weight.detach().cpu().clone().reshape(-1).view(torch.uint8).numpy().tobytes()
    feed_fingerprint(h, f"{name}.weight", TensorInfo(dtype_code(weight.dtype), tuple(weight.shape), (0, len(raw))), raw)


def _holds_the_base(layers: list[tuple[str, LoraLinear | LoraEmbedding]]) -> bool:
    """Whether the adapted layers hold the base's own weights (not quantized, not a PiSSA/OLoRA residual)."""
    return not any(is_quantized(layer.base_layer) or converted_factors(layer) is not None for _, layer in layers)
