"""One decoder layer's sibling projections, per-linear vs grouped (`sibling_lora`), CPU ms per forward + backward.

q/k/v (576 → 576, 192, 192) and gate/up (576 → 1536) of SmolLM2-135M, r16, over --tokens tokens, in
one process, the two ways alternated over --rounds and the best CPU time of each kept (a loaded
machine's other jobs cost wall time, not this process's CPU time).

    python bench/sibling_lora.py --dtype bf16 --threads 1
    python bench/sibling_lora.py --dtype bf16 --threads 1 --layers 4   # whole decoder layers instead

With --layers, a random Llama of SmolLM2's shape and that many layers, r16 all-linear injected: the
decoder stack's forward + backward over 8 rows of --tokens / 8 tokens (the head and loss left out).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import torch
from torch import nn

from loractl.train import LoraLinear
from loractl.train.inject import group_siblings

SHAPES = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "gate_proj": 1536, "up_proj": 1536}


def step(model: nn.ModuleDict, x: torch.Tensor, grouped: bool) -> float:
    for layer in model.values():
        layer.siblings = layer.grouped if grouped else None
    x = x.detach().requires_grad_(True)
    start = time.process_time()
    outs = [model[n](x) for n in SHAPES]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return time.process_time() - start


def decoder_step(model: nn.Module, ids: torch.Tensor, grouped: bool) -> float:
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            layer.siblings = layer.grouped if grouped else None
    start = time.process_time()
    model.model(ids).last_hidden_state.float().square().mean().backward()
    return time.process_time() - start


def decoder_stack(args: argparse.Namespace, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    from random_llama import build_model, llama_config
    from train import SMOLLM2

    from loractl.train import TrainConfig, inject

    model = build_model(llama_config({**SMOLLM2, "layers": args.layers}, dtype), dtype)
    inject(model, TrainConfig(rank=16, alpha=32, targets="all-linear"))
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            layer.grouped = layer.siblings
    ids = torch.randint(0, SMOLLM2["vocab"], (8, args.tokens // 8), generator=torch.Generator().manual_seed(0))
    return model, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, help="whole decoder layers of a random SmolLM2-shaped Llama")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.layers:
        model, ids = decoder_stack(args, dtype)
        run = functools.partial(decoder_step, model, ids)
    else:
        run = projections(args, dtype)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for grouped in (False, True):
            best[grouped] = min(best[grouped], run(grouped))
    alone, together = best[False] * 1e3, best[True] * 1e3
    what = f"{args.layers} decoder layers" if args.layers else "q/k/v + gate/up"
    print(f"{what}, {args.dtype}, {args.tokens} tokens, {args.threads} thread(s): per-linear {alone:.1f} ms, "
          f"grouped {together:.1f} ms ({together / alone:.2f}x)")  # fmt: skip


def projections(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    """One layer's five sibling projections; a function of `grouped` that times one forward + backward."""
    model = nn.ModuleDict({n: LoraLinear(nn.Linear(576, o, bias=False).to(dtype), 16, 32.0) for n, o in SHAPES.items()})
    group_siblings(nn.ModuleDict({"attn": model}))
    for layer in model.values():
        layer.grouped = layer.siblings
    x = torch.randn(args.tokens, 576).to(dtype)
    return functools.partial(step, model, x)


if __name__ == "__main__":
    main()
