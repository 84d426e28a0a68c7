"""The frozen base weight of an adapted layer, in the dtype its matmuls run in.

A base held in bf16/fp16 or quantized by bitsandbytes saves memory, not time: on a CPU without
bf16 matrix units (no AVX512_BF16/AMX) a bf16 matmul runs about 4x slower than a float32 one,
and bitsandbytes' 4-bit and 8-bit layers dequantize before every matmul anyway. There the
fastest exact path is to upcast (or dequantize) the stored weight to float32 for the matmul and
drop it straight after: the memory stays that of the stored weights plus one float32 layer
weight at a time. CUDA, and CPUs with bf16 units, keep the low-precision matmul.

`LORACTL_BASE_MATMUL=float32|native` overrides the choice (`native`: the stored dtype, or
bitsandbytes' compute dtype for a quantized layer).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

ENV = "LORACTL_BASE_MATMUL"
CHOICES = ("float32", "native")


def matmul_dtype(native: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a frozen matmul whose weights would natively compute in `native` runs in on `device`."""
    choice = os.environ.get(ENV, "")
    if choice not in ("", *CHOICES):
        from ..errors import UsageError

        raise UsageError(
            f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}", hint=f"unset {ENV} to choose by device"
        )
    if native in (torch.float32, torch.float64) or choice == "native":
        return native
    if choice == "float32" or (device.type == "cpu" and not cpu_has_bf16_units()):
        return torch.float32
    return native


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's own probe: AVX512_BF16, AMX or ARM BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def frozen_weight(layer: nn.Module, activation: torch.dtype) -> torch.Tensor:
    """`layer`'s weight as (out, in), in its matmul dtype: the stored tensor itself when no cast is needed.

    `activation` is the dtype of the layer's input (what an int8 layer and a 4-bit layer without a
    compute dtype natively compute in). A cast or dequantized weight is a fresh tensor the caller drops.
    """
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if is_conv1d(layer):
        weight = weight.t()  # transformers' Conv1D stores (in, out)
    state = quant_state(layer)
    if state is not None:  # bitsandbytes Linear4bit (nf4, fp4)
        import bitsandbytes.functional as bnb_functional

        native = getattr(layer, "compute_dtype", None) or activation
        dense = bnb_functional.dequantize_4bit(weight.data, state)
        return dense.to(matmul_dtype(native, dense.device))
    if weight.dtype.is_floating_point:
        return weight.to(matmul_dtype(weight.dtype, weight.device))
    return _int8_weight(layer, matmul_dtype(activation, weight.device))


def quant_state(layer: nn.Module) -> Any:
    """A bitsandbytes 4-bit layer's quantization state (None for any other layer).

    It sits on the packed weight, and on the layer too: FSDP replaces the weight by a plain view of its
    flat parameter (in `quant_storage`, a float dtype under QLoRA-FSDP), and the layer's copy survives that.
    """
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def _int8_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes `Linear8bitLt` weight dequantized as its own training matmul does: CB · SCB / 127."""
    state = getattr(layer, "state", None)
    codes = getattr(state, "CB", None)
    scales = getattr(state, "SCB", None)
    if codes is None or scales is None:  # not yet moved into the layer's state by a first forward
        codes, scales = layer.weight.data, layer.weight.SCB  # type: ignore[union-attr]
    assert isinstance(codes, torch.Tensor) and isinstance(scales, torch.Tensor)
    return codes.to(dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None
