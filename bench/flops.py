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

import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

MATMUL_SIZE = 2048  # the square matmul whose rate the step is held against
ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # oneDNN reads it once, when torch first runs one of its kernels
# oneDNN's names for the ISA caps worth measuring on an x86 CPU (lower case here, upper case in the variable):
# avx512_core_bf16 is a CPU with avx512_bf16 and no AMX, avx512_core one without bf16 units, avx2 an older one
ISA_CAPS = ("avx2", "avx512_core", "avx512_core_vnni", "avx512_core_bf16", "avx512_core_amx")
_PROBE = "import torch; a = torch.ones(256, 256, dtype=torch.bfloat16); a @ a"


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


def frozen_products(
    shape: dict[str, int], *, tokens: int, labelled: int, chunk: int = 256
) -> list[tuple[int, int, int, str]]:
    """The step's frozen GEMMs as (rows of the activation, out, in, "forward" | "input grad") per call, each call
    once per layer (the linears) or per head chunk: the weight (out, in) multiplied as x·Wᵀ forward and g·W back."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = hidden * shape["kv_heads"] // shape["heads"]
    linears = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
               (hidden, inter)]  # fmt: skip
    calls = [(tokens, o, i, way) for o, i in linears for way in ("forward", "input grad")] * shape["layers"]
    for start in range(0, labelled, chunk):
        rows = min(chunk, labelled - start)
        calls += [(rows, shape["vocab"], hidden, "forward"), (rows, shape["vocab"], hidden, "input grad")]
    return calls


def products_seconds(calls: list[tuple[int, int, int, str]], dtype_name: str, repeats: int = 3) -> tuple[float, float]:
    """Wall and CPU seconds the GEMMs of `calls` take run one by one in `dtype_name` with this process's threads, each distinct
    product timed (median of `repeats` after a warm-up) on random operands in the step's layout: the floor a step
    whose every frozen matmul ran at its own shape's rate, and nothing else, would reach."""
    import torch

    dtype, g = getattr(torch, dtype_name), torch.Generator().manual_seed(0)
    seconds: dict[tuple[int, int, int, str], tuple[float, float]] = {}
    for call in set(calls):
        rows, out, inner, way = call
        weight = torch.randn(out, inner, generator=g).to(dtype)
        act = torch.randn(rows, inner if way == "forward" else out, generator=g).to(dtype)
        runs = [_timed(act, weight, way) for _ in range(repeats + 1)][1:]  # the first a warm-up
        seconds[call] = (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
    return sum(seconds[c][0] for c in calls), sum(seconds[c][1] for c in calls)


def _timed(act: Any, weight: Any, way: str) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    _ = act @ weight.t() if way == "forward" else act @ weight
    return time.perf_counter() - start, time.process_time() - start_cpu


def matmul_rate(dtype_name: str, size: int = MATMUL_SIZE, repeats: int = 5, device: str = "cpu") -> tuple[float, float]:
    """FLOP per wall second and per CPU second (all threads) of a (size × size) · (size × size) matmul in
    `dtype_name` (float32, bfloat16) with this process's torch threads: medians of `repeats` runs after a warm-up.

    On a loaded machine the wall rate measures the other jobs too; the CPU rate is the work alone (with one
    thread exactly, with several it also counts threads spinning at a barrier). On a CUDA `device` each run
    is timed between synchronizations (the CPU rate then counts the host's wait).
    """
    import torch

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    flops = 2 * size**3
    return flops / statistics.median(wall), flops / statistics.median(cpu)


def cpu_flags() -> dict[str, bool]:
    """The CPU features a bf16 matmul depends on (/proc/cpuinfo), and oneDNN's own bf16 probe."""
    from loractl.train.base_matmul import cpu_flags as found

    return {flag: flag in found() for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "onednn_bf16")}


def cap_isa(isa: str) -> None:
    """Cap oneDNN (torch's bf16 matmuls and convolutions on a CPU) at `isa`, one of `ISA_CAPS`, for this process and
    the children it starts: a CPU with AMX then runs the kernels a CPU without it would. float32 matmuls go through
    MKL, which the cap does not touch (AMX has no float32 path anyway)."""
    if "torch" in sys.modules:  # oneDNN may have read the variable already: a cap set now could silently not hold
        raise RuntimeError(f"cap the ISA before torch is imported ({ISA_ENV}={isa.upper()})")
    os.environ[ISA_ENV] = isa.upper()


def onednn_isa() -> dict[str, str | None]:
    """What oneDNN runs on here, under this process's environment (its ISA cap included): a child process with
    ONEDNN_VERBOSE=1 multiplies two bf16 matrices, and oneDNN's own lines say the ISA it chose and the matmul
    kernel it ran (e.g. "brg_matmul:avx512_core_amx"). The proof that a cap took effect, not the variable's value."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True).stdout
    isa = re.search(r"^onednn_verbose,.*,cpu,isa:(.*)$", out, re.MULTILINE)
    kernel = re.search(r"^onednn_verbose,.*,exec,cpu,matmul,([^,]+),", out, re.MULTILINE)
    return {"cap": os.environ.get(ISA_ENV), "isa": isa and isa[1].strip(), "bf16_matmul": kernel and kernel[1]}
