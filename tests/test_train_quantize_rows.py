"""4-bit quantization in row blocks: bitsandbytes' bytes exactly, without its whole-matrix float32 temporaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracles import oracle

from loractl.train import quantize_rows
from loractl.train.base import load_base
from loractl.train.quantize_rows import quantize_4bit

oracle("bitsandbytes", "bitsandbytes", "qlora")
from bitsandbytes import functional  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny-llama"


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_row_blocks_give_bitsandbytes_bytes(
    monkeypatch: pytest.MonkeyPatch, quant_type: str, double: bool, storage: torch.dtype
) -> None:
    """Packed weights, absmax, and with double quantization the nested absmax, its offset and its own
    state: all equal to bitsandbytes quantizing the whole matrix (300 rows in blocks of 64: a short last one)."""
    monkeypatch.setattr(quantize_rows, "ROW_BLOCK_WEIGHTS", 64 * 192)
    weight = (torch.randn(300, 192, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    weight[7, :64] = 0  # an all-zero block (absmax 0)
    options = {"compress_statistics": double, "quant_type": quant_type, "quant_storage": storage}
    calls: list[int] = []

    def counted(a: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, functional.QuantState]:
        calls.append(a.shape[0])
        return functional.quantize_4bit(a, *args, **kw)  # type: ignore[arg-type]

    packed, state = quantize_4bit(weight, **options, whole=counted)  # type: ignore[arg-type]
    assert calls == [64, 64, 64, 64, 44]  # it did work in row blocks
    ref_packed, ref = functional.quantize_4bit(weight, **options)  # type: ignore[arg-type]
    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert _bytes(packed) == _bytes(ref_packed)
    assert _bytes(state.absmax) == _bytes(ref.absmax)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (
        ref.shape, ref.dtype, ref.blocksize, ref.quant_type)  # fmt: skip
    assert torch.equal(state.code, ref.code)
    if double:
        assert state.absmax.dtype == torch.uint8  # the nested (8-bit) absmax
        assert _bytes(state.offset) == _bytes(ref.offset)
        assert _bytes(state.state2.absmax) == _bytes(ref.state2.absmax)
        assert torch.equal(state.state2.code, ref.state2.code) and state.state2.blocksize == ref.state2.blocksize
    assert torch.equal(functional.dequantize_4bit(packed, state), functional.dequantize_4bit(ref_packed, ref))


def test_matrices_that_cannot_split_go_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows not a multiple of the blocksize (a block would straddle two rows), or a matrix within one row block."""
    monkeypatch.setattr(quantize_rows, "ROW_BLOCK_WEIGHTS", 64 * 128)
    calls: list[tuple[int, ...]] = []

    def counted(a: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, functional.QuantState]:
        calls.append(tuple(a.shape))
        return functional.quantize_4bit(a, *args, **kw)  # type: ignore[arg-type]

    for shape in ((200, 96), (64, 128), (40, 128)):  # 96 % 64 ≠ 0; 64 × 128 and 40 × 128 in one block
        weight = torch.randn(*shape)
        packed, _ = quantize_4bit(weight, quant_type="nf4", whole=counted)
        assert _bytes(packed) == _bytes(functional.quantize_4bit(weight, quant_type="nf4")[0])
    assert calls == [(200, 96), (64, 128), (40, 128)]


def test_load_base_quantizes_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_base(quantize=...)` goes through the row blocks (2,048 weights at a time),
    with the bytes of bitsandbytes quantizing each checkpoint matrix whole; the swap is undone after."""
    from safetensors.torch import load_file

    monkeypatch.setattr(quantize_rows, "ROW_BLOCK_WEIGHTS", 32 * 64)
    original = functional.quantize_4bit
    seen: list[int] = []
    real = quantize_rows.quantize_4bit

    def spy(a: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, functional.QuantState]:
        seen.append(quantize_rows._rows_per_block(a, 64))
        return real(a, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(quantize_rows, "quantize_4bit", spy)
    model, _ = load_base(TINY, quantize="nf4")
    assert functional.quantize_4bit is original
    assert len(seen) == 14  # 7 linears × 2 layers; all but k_proj and v_proj (32 rows: one block) split
    assert sorted(seen) == [0] * 4 + [16] * 2 + [32] * 8
    state = load_file(str(TINY / "model.safetensors"))
    layer = model.model.layers[1].mlp.up_proj  # 128 × 64: 4 row blocks
    ref, _ = functional.quantize_4bit(state["model.layers.1.mlp.up_proj.weight"], quant_type="nf4")
    assert _bytes(layer.weight.data) == _bytes(ref)


ROW_BLOCK_PEAK = """
import json, threading, time, torch
from bitsandbytes import functional
from loractl.train.quantize_rows import quantize_4bit

def anonymous():  # resident anonymous memory: no shared-library page that memory pressure may evict
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

def growth(fn):  # fn's result, and the peak of anonymous memory above the start while it ran (1 ms samples)
    base, peak, done = anonymous(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous() - base)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        sampler.join()

weight = torch.randn(12288, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)  # 96 MiB
functional.quantize_4bit(weight[:64].clone(), quant_type="nf4")  # bitsandbytes' lazy set-up, small
(rows, _), in_rows = growth(lambda: quantize_4bit(weight, quant_type="nf4"))
(whole, _), at_once = growth(lambda: functional.quantize_4bit(weight, quant_type="nf4"))
print(json.dumps({"rows": in_rows, "whole": at_once, "same": torch.equal(rows, whole)}))
"""


def test_row_blocks_bound_the_quantizer_s_temporaries() -> None:
    """Peak anonymous memory while quantizing a 48 M-weight bf16 matrix: bitsandbytes whole adds ≈ 16 bytes per
    weight (float32 copies, int32 bucket ids); in row blocks of 8 M weights, about one block's worth."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", ROW_BLOCK_PEAK], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert peaks["same"]
    assert peaks["rows"] < 250e6, peaks  # 24 MiB packed (twice: blocks, then joined) + one block's temporaries
    assert peaks["whole"] > 500e6, peaks  # the control: bitsandbytes on the whole matrix
