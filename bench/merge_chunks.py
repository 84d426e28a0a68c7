"""Microbenchmark: the CPU of one placed-merge block, its passes over whole 2 MB buffers or over row chunks.

    PYTHONPATH=. python bench/merge_chunks.py --rounds 4

Merges one bf16 tensor of each Flux.1 block shape (random values, a rank-16 update) block by block on this thread,
as the single-file merge's pool threads do: `_Block.merge`, the cast into a write buffer, the cast read back and
`_Merged.figures` (each pass over the whole block: the staged path, and the single file's before `_Block.cast`),
against `_Block.cast` with chunks of 2^15–2^18 values. Prints the least thread CPU seconds of `--rounds`, and checks
that every variant gives the same figures and bytes.
"""

from __future__ import annotations

import argparse
import time
from itertools import pairwise

import torch

import loractl.ops.merge_placed as placed
from loractl.ops.merge_kernel import Delta, block_bounds, kernel_threads
from loractl.ops.merge_placed_plan import BlockFigures

SHAPES = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]  # Flux.1's
IN_FLIGHT = 6  # buffer sets in turn, as the blocks in flight use them


def _passes(
    block: placed._Block, w: torch.Tensor, buffers: torch.Tensor, out: torch.Tensor, start: int
) -> BlockFigures:
    m = block.merge(w, buffers, start)
    stored = out.view(m.merged.shape).copy_(m.merged)
    return m.figures(m.stored(stored), False)


def _chunked(
    block: placed._Block, w: torch.Tensor, buffers: torch.Tensor, out: torch.Tensor, start: int
) -> BlockFigures:
    return block.cast(w, out.view(w.shape[0], -1), buffers, start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    tensors = [((torch.randn(r, c) * 0.02).bfloat16(), Delta(torch.randn(r, 16) * 0.01, torch.randn(16, c) * 0.01, 1.0))
               for r, c in SHAPES]  # fmt: skip
    buffers = [torch.empty(3, placed.BLOCK) for _ in range(IN_FLIGHT)]
    outs = [torch.empty(placed.BLOCK, dtype=torch.bfloat16) for _ in range(IN_FLIGHT)]
    variants = [("whole-block passes", _passes, placed.CHUNK)] + [
        (f"chunks of 2^{k}", _chunked, 1 << k) for k in range(15, 19)
    ]
    seconds: dict[str, list[float]] = {}
    results: dict[str, tuple[list[BlockFigures], int]] = {}
    with kernel_threads():
        for _ in range(args.rounds):
            for name, run, chunk in variants:
                placed.CHUNK, figures, checksum = chunk, [], 0
                start = time.thread_time()
                for w_all, delta in tensors:
                    rows, cols = w_all.shape
                    block = placed._Block("w", cols, 2, [delta], torch.device("cpu"), False)
                    for i, (a, b) in enumerate(pairwise(block_bounds(rows, cols, placed.BLOCK))):
                        raw = buffers[i % IN_FLIGHT][0].view(torch.uint8)[: (b - a) * cols * 2]
                        w = raw.copy_(w_all[a:b].reshape(-1).view(torch.uint8)).view(torch.bfloat16).view(b - a, cols)
                        out = outs[i % IN_FLIGHT][: (b - a) * cols]
                        figures.append(run(block, w, buffers[i % IN_FLIGHT], out, a))
                        checksum += int(out.view(torch.int16).sum())
                seconds.setdefault(name, []).append(time.thread_time() - start)
                results[name] = (figures, checksum)
    first = next(iter(results.values()))
    print(f"same figures and bytes: {all(r == first for r in results.values())}")
    print("| variant | thread CPU s (least) |\n|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {min(s):.3f} |")


if __name__ == "__main__":
    main()
