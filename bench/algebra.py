"""Benchmark: loractl's factored resize / svd-combine against dense SVDs (kohya-style) and PEFT, in one run.

    python bench/algebra.py                       # everything (PEFT part: ~5-10 min on 2 cores)
    python bench/algebra.py --targets q_proj,down_proj --repeats 3
    python bench/algebra.py --resize-only --repeats 7 --dense-repeats 3

1. resize of one rank-64 4096×4096 module to rank 16: loractl `resize` (QR of the factors + SVD of a
   64×64 core) vs a dense full SVD of ΔW (kohya resize_lora.py with --svd_lowrank_niter 0, and
   PEFT-style) and kohya's default `torch.svd_lowrank(q=2r, niter=2)` for matrices over 2048.
2. svd-combine of four rank-16 adapters (weights 0.4/0.3/0.2/0.1) to rank 16: loractl over the whole
   7B Llama module set (32 layers × q,k,v,o 4096², gate/up 11008×4096, down 4096×11008), and on one
   7B-shaped layer against PEFT `add_weighted_adapter(combination_type="svd")` and a dense thin SVD.
Errors are ‖ΔW − ΔW'‖_F / ‖ΔW‖_F against the exact weighted sum, in float64.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from timing import timed  # bench/timing.py (the script's own directory is on sys.path)

from loractl.adapter import Adapter, LoraModule
from loractl.ops.combine import CombineOptions, combine
from loractl.ops.lowrank import RankRule
from loractl.ops.resize import resize

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # fmt: skip
WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def rel_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """‖ref − approx‖_F / ‖ref‖_F in float64, row block by row block."""
    num = den = 0.0
    for i in range(0, reference.shape[0], 1024):
        r = reference[i : i + 1024].double()
        num += float((r - approx[i : i + 1024].double()).square().sum())
        den += float(r.square().sum())
    return math.sqrt(num / den)


def module(out: int, inp: int, rank: int, seed: int, decay: bool = True) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out, rank, generator=g) / math.sqrt(rank)
    if decay:  # trained adapters have decaying spectra; it also makes the rank-16 truncation meaningful
        b = b * torch.logspace(0, -2, rank)
    return LoraModule(A=torch.randn(rank, inp, generator=g) / math.sqrt(inp), B=b, scale=2.0, alpha=2.0 * rank)


def dense_truncate(delta: torch.Tensor, rank: int, full_matrices: bool) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def bench_resize(repeats: int, dense_repeats: int = 1) -> list[tuple[str, float, float]]:
    m = module(4096, 4096, 64, seed=0)
    delta = m.delta_weight()
    adapter = Adapter(modules={"m": m})
    rows = []
    t, res = timed(lambda: resize(adapter, RankRule(rank=16)), repeats)
    rows.append(("loractl resize (factored)", t, rel_error(delta, res.adapter.modules["m"].delta_weight())))
    t, approx = timed(lambda: dense_truncate(delta, 16, full_matrices=True), dense_repeats)
    rows.append(("dense full SVD (kohya --svd_lowrank_niter 0)", t, rel_error(delta, approx)))

    def lowrank() -> torch.Tensor:
        u, s, v = torch.svd_lowrank(delta, q=32, niter=2)
        return (u[:, :16] * s[:16]) @ v[:, :16].T

    t, approx = timed(lowrank, repeats)
    rows.append(("kohya default: svd_lowrank(q=2r, niter=2)", t, rel_error(delta, approx)))
    return rows


def seven_b_adapters(layers: int) -> list[Adapter]:
    names = [(f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}", p)
             for i in range(layers) for p in SHAPES]  # fmt: skip
    return [
        Adapter(modules={n: module(*SHAPES[p], 16, seed=1000 * j + k) for k, (n, p) in enumerate(names)})
        for j in range(len(WEIGHTS))
    ]


def bench_combine_full(repeats: int) -> tuple[int, float]:
    adapters = seven_b_adapters(32)
    options = CombineOptions(method="svd", weights=WEIGHTS, rule=RankRule(rank=16))
    t, _ = timed(lambda: combine(adapters, options), repeats)
    return len(adapters[0].modules), t


def bench_combine_vs_peft(targets: list[str], repeats: int) -> list[tuple[str, str, float, float]]:
    """One 7B-shaped Llama layer: loractl, PEFT add_weighted_adapter('svd'), dense thin SVD, per module."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=64)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                                init_lora_weights=False), adapter_name="a0")  # fmt: skip
    for j in range(1, len(WEIGHTS)):
        model.add_adapter(f"a{j}", LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    layers = {
        n: mod for n, mod in model.base_model.model.named_modules() if hasattr(mod, "lora_A") and "a0" in mod.lora_A
    }
    names = [f"a{j}" for j in range(len(WEIGHTS))]
    adapters = [
        Adapter(modules={n: LoraModule(A=lay.lora_A[a].weight.detach().clone(), B=lay.lora_B[a].weight.detach().clone(),
                                       scale=float(lay.scaling[a]), alpha=32.0) for n, lay in layers.items()})
        for a in names
    ]  # fmt: skip
    options = CombineOptions(method="svd", weights=WEIGHTS, rule=RankRule(rank=16))
    t_ours, res = timed(lambda: combine(adapters, options), repeats)
    start = time.perf_counter()
    with torch.no_grad():
        model.add_weighted_adapter(names, list(WEIGHTS), "mix", combination_type="svd", svd_rank=16)
    t_peft = time.perf_counter() - start
    rows = []
    for n, lay in layers.items():
        with torch.no_grad():
            exact = sum(w * lay.get_delta_weight(a).double() for w, a in zip(WEIGHTS, names, strict=True))
            peft_delta = lay.get_delta_weight("mix")
        t_dense, dense = timed(lambda: dense_truncate(exact.float(), 16, full_matrices=False), 1)  # noqa: B023
        short = n.rsplit(".", 1)[-1]
        rows.append(
            (short, "loractl (factored)", t_ours / len(layers), rel_error(exact, res.adapter.modules[n].delta_weight()))
        )
        rows.append((short, "PEFT add_weighted_adapter(svd)", t_peft / len(layers), rel_error(exact, peft_delta)))
        rows.append((short, "dense thin SVD (float32)", t_dense, rel_error(exact, dense)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default=",".join(SHAPES), help="modules of the PEFT layer (default: all 7)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--resize-only", action="store_true", help="only the resize comparison")
    parser.add_argument("--dense-repeats", type=int, default=1, help="repeats of the dense full SVD (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("\n## resize: one rank-64 4096×4096 module to rank 16\n")
    print("| method | seconds | rel. error |\n|---|---:|---:|")
    rows = bench_resize(args.repeats, args.dense_repeats)
    for name, t, err in rows:
        print(f"| {name} | {t:.4f} | {err:.6g} |")
    print(
        f"\nspeed-up vs dense full SVD: {rows[1][1] / rows[0][1]:,.0f}×; vs svd_lowrank: {rows[2][1] / rows[0][1]:,.0f}×"
    )
    if args.resize_only:
        return
    count, t = bench_combine_full(args.repeats)
    print(f"\n## svd-combine, four rank-16 adapters → rank 16, whole 7B module set ({count} modules)\n")
    print(f"loractl: {t:.2f} s in all, {1000 * t / count:.1f} ms per module")
    if args.skip_peft:
        return
    print("\n## svd-combine on one 7B-shaped layer: per module\n")
    print("| module | method | seconds/module | rel. error |\n|---|---|---:|---:|")
    for short, name, secs, err in bench_combine_vs_peft(args.targets.split(","), args.repeats):
        print(f"| {short} | {name} | {secs:.4f} | {err:.6g} |")


if __name__ == "__main__":
    main()
