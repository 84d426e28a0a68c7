"""One decoder layer's sibling projections, per-linear vs grouped (`sibling_lora`), CPU ms per forward + backward.

q/k/v (576 → 576, 192, 192) and gate/up (576 → 1536) of SmolLM2-135M, r16, over --tokens tokens, in
one process, the two ways alternated over --rounds and the best CPU time of each kept (a loaded
machine's other jobs cost wall time, not this process's CPU time).

    python bench/sibling_lora.py --dtype bf16 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from loractl.train import LoraLinear
from loractl.train.sibling_lora import group_siblings

SHAPES = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "gate_proj": 1536, "up_proj": 1536}


def step(model: nn.ModuleDict, x: torch.Tensor, grouped: bool) -> float:
    for layer in model.values():
        layer.siblings = layer.grouped if grouped else None
    x = x.detach().requires_grad_(True)
    start = time.process_time()
    outs = [model[n](x) for n in SHAPES]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = nn.ModuleDict({n: LoraLinear(nn.Linear(576, o, bias=False).to(dtype), 16, 32.0) for n, o in SHAPES.items()})
    group_siblings(nn.ModuleDict({"attn": model}))
    for layer in model.values():
        layer.grouped = layer.siblings
    x = torch.randn(args.tokens, 576).to(dtype)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for grouped in (False, True):
            best[grouped] = min(best[grouped], step(model, x, grouped))
    alone, together = best[False] * 1e3, best[True] * 1e3
    print(f"{args.dtype}, {args.tokens} tokens, {args.threads} thread(s): per-linear {alone:.1f} ms, "
          f"grouped {together:.1f} ms ({together / alone:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
