"""A LoRA training step's model FLOPs, and the machine's own matmul rate to hold them against.

The step's work on a Llama (T = batch × seq tokens, all-linear LoRA of rank r, frozen base and head):
- each frozen linear (in → out): forward and input gradient, 2 × 2·T·in·out (no weight gradient);
- the head (hidden → vocab): the same, 4·T·hidden·vocab, over every position that takes a loss;
- each LoRA pair: x·Aᵀ and (xAᵀ)·Bᵀ forward, B's and A's gradients and the input gradient backward: 6·T·r·(in + out);
- attention: Q·Kᵀ and P·V, forward (4·T·seq·hidden per layer) and backward (twice that), counted whole, as
  torch's FLOP counter counts SDPA (a causal kernel can skip half).
Elementwise work (norms, activations, softmax, AdamW) is left out, as model-FLOP counts do.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

MATMUL_SIZE = 2048  # the square matmul whose rate the step is held against


def step_flops(shape: dict[str, int], *, batch: int, seq: int, rank: int, label_share: float = 1.0) -> float:
    """Model FLOPs of one all-linear LoRA step on a Llama of `shape` (hidden, intermediate, layers, heads,
    kv_heads, vocab); `label_share` of the positions take a loss (the head's work on them alone)."""
    tokens, hidden = batch * seq, shape["hidden"]
    kv = hidden * shape["kv_heads"] // shape["heads"]
    inter = shape["intermediate"]
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
               (inter, hidden)]  # fmt: skip
    frozen = sum(4 * tokens * i * o for i, o in linears)
    lora = sum(6 * tokens * rank * (i + o) for i, o in linears)
    attention = 12 * tokens * seq * hidden
    head = 4 * tokens * label_share * hidden * shape["vocab"]
    return float(shape["layers"] * (frozen + lora + attention) + head)


def matmul_rate(dtype_name: str, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of a (size × size) · (size × size) matmul in `dtype_name` (float32, bfloat16) with this process's
    torch threads: the median of `repeats` timed runs after one warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def cpu_flags() -> dict[str, bool]:
    """The CPU features a bf16 matmul depends on (/proc/cpuinfo), and oneDNN's own bf16 probe."""
    from loractl.train.base_matmul import cpu_has_bf16_units

    cpuinfo = Path("/proc/cpuinfo")
    words = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    flags = {flag: flag in words for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    return {**flags, "onednn_bf16": cpu_has_bf16_units()}
