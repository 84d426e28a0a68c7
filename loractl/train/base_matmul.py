"""The frozen base weight of an adapted layer, in the dtype its matmuls run in.

A base held in bf16/fp16 or quantized by bitsandbytes saves memory, not always time: on a CPU
without bf16 matrix units (no AVX512_BF16/AMX) a bf16 matmul runs 4-140x slower than a float32
one, while with AMX it runs 7-8x faster; bitsandbytes' 4-bit and 8-bit layers dequantize before
every matmul anyway. Which is faster also depends on the shape and the layout (oneDNN's bf16
kernels have fast and slow operand orders), so on a CPU the choice is measured, not assumed:
the first time a weight shape is multiplied, a micro-benchmark times its forward (x · Wᵀ) and
input-gradient (g · W) products both ways, float32 (upcast included) and native, and the
faster is kept for that (shape, dtype, CPU flags, threads) for the rest of the process. The
upcast path is exact (float32 products of the same bf16 values, rounded to bf16 where the
native one would round); memory stays that of the stored weights plus one float32 layer
weight at a time. CUDA keeps the low-precision matmul.

`LORACTL_BASE_MATMUL=float32|native` overrides the choice (`native`: the stored dtype, or
bitsandbytes' compute dtype for a quantized layer).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENV = "LORACTL_BASE_MATMUL"
CHOICES = ("float32", "native")
PROBE_TOKENS = 256  # rows of x in the micro-benchmark: a micro-batch's worth, the rate no longer grows past it
PROBE_ROWS = 512  # at most this many of W's output rows: the rate per FLOP holds, big weights stay cheap
ROUNDS = 4  # timed runs each way; the best of each is compared
SLOWER = 5.0  # native this many times float32's after two rounds ends the measurement (emulated bf16)


def matmul_dtype(native: torch.dtype, device: torch.device, shape: Sequence[int] | None = None) -> torch.dtype:
    """The dtype a frozen matmul whose weights would natively compute in `native` runs in on `device`.

    `shape` is the weight's (out, in): on a CPU the faster of float32 and `native` for it, measured
    (`measured_choice`); without it, oneDNN's bf16 probe decides (a guess, for callers with no shape).
    """
    choice = os.environ.get(ENV, "")
    if choice not in ("", *CHOICES):
        from ..errors import UsageError

        raise UsageError(
            f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}", hint=f"unset {ENV} to choose by measuring"
        )
    if native in (torch.float32, torch.float64) or choice == "native":
        return native
    if choice == "float32":
        return torch.float32
    if device.type != "cpu":
        return native
    if shape is None:
        return native if cpu_has_bf16_units() else torch.float32
    out_in = (int(shape[0]), int(shape[1]))
    if torch.compiler.is_compiling():  # a trace runs on fake tensors: timing it would measure nothing
        known = MEASURED.get(_key(out_in, native, torch.get_num_threads()))
        return known.dtype if known else matmul_dtype(native, device)
    return measured_choice(out_in, native, torch.get_num_threads()).dtype


@dataclass(frozen=True)
class Choice:
    """One measured shape: seconds of its forward + input-gradient products each way, and the dtype kept."""

    shape: tuple[int, int]
    native: torch.dtype
    float32_s: float
    native_s: float
    flops: float  # of one timed forward + input gradient (PROBE_TOKENS rows, at most PROBE_ROWS of W)

    @property
    def dtype(self) -> torch.dtype:
        return self.native if self.native_s < self.float32_s else torch.float32


MEASURED: dict[tuple[Any, ...], Choice] = {}


def measured_choice(shape: tuple[int, int], native: torch.dtype, threads: int) -> Choice:
    """float32 (upcast included) against `native` for a weight of `shape`, timed once per (shape, native,
    CPU flags, threads) in this process: forward x · Wᵀ and input gradient g · W, best of `ROUNDS` each."""
    key = _key(shape, native, threads)
    if key not in MEASURED:
        MEASURED[key] = _measure(shape, native)
    return MEASURED[key]


def _key(shape: tuple[int, int], native: torch.dtype, threads: int) -> tuple[Any, ...]:
    return (shape, native, cpu_flags(), threads)


def _measure(shape: tuple[int, int], native: torch.dtype) -> Choice:
    out, inner = min(shape[0], PROBE_ROWS), shape[1]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out, inner, generator=g).to(native)
    xn = torch.randn(PROBE_TOKENS, inner, generator=g).to(native)
    gn = torch.randn(PROBE_TOKENS, out, generator=g).to(native)

    def upcast() -> None:  # as `LoraLinear` runs it: the weight upcast once per product, activations cast
        (xn.float() @ weight.float().t()).to(native)
        (gn.float() @ weight.float()).to(native)

    def in_native() -> None:
        xn @ weight.t()
        gn @ weight

    with torch.no_grad():
        upcast()  # warm-up: oneDNN creates (JIT-compiles) a kernel per new shape on its first call
        in_native()
        float32_s = native_s = math.inf
        for round_ in range(ROUNDS):  # alternated, so a burst of load hits both ways alike
            float32_s, native_s = min(float32_s, _time(upcast)), min(native_s, _time(in_native))
            if round_ and native_s > SLOWER * float32_s:  # twice far slower: emulated bf16, no need for more
                break
    return Choice(shape, native, float32_s, native_s, 2 * 2.0 * PROBE_TOKENS * out * inner)


def _time(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's matrix-relevant features (/proc/cpuinfo) and oneDNN's bf16 probe: part of a measurement's key."""
    cpuinfo = Path("/proc/cpuinfo")
    words = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    found = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in words]
    return (*found, *(("onednn_bf16",) if cpu_has_bf16_units() else ()))


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
        return dense.to(matmul_dtype(native, dense.device, dense.shape))
    if weight.dtype.is_floating_point:
        return weight.to(matmul_dtype(weight.dtype, weight.device, weight.shape))
    return _int8_weight(layer, matmul_dtype(activation, weight.device, weight.shape))


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
