"""Benchmark: --budget (ranks chosen together) against the uniform rank of the same size, on real adapters.

    python bench/budget.py                        # ~1 min on 2 cores
    python bench/budget.py --adapters ../shared/real-adapters --ranks 1,2,3

1. Accuracy: for each real adapter and uniform rank r, `resize_to_budget` with the parameters the
   uniform resize to r uses, against `resize(--rank r)`: total ‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all
   modules (from the per-module reports and ‖ΔW‖ computed from the factors), and the ratio.
2. Time: `allocate` on Llama-7B shapes (224 modules, spectra 64 deep, budget = uniform rank 16),
   and `resize_to_budget` against `resize(--rank)` on the largest real adapter, side by side.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import torch
from timing import timed  # bench/timing.py (the script's own directory is on sys.path)

from loractl.adapter import Adapter
from loractl.formats import load_adapter
from loractl.ops.budget import allocate
from loractl.ops.linalg import factored_frobenius
from loractl.ops.lowrank import RankRule, matrices
from loractl.ops.resize import AlgebraResult, resize, resize_to_budget

_HERE = Path(__file__).resolve()
REAL = next((p / "shared" / "real-adapters" for p in _HERE.parents if (p / "shared" / "real-adapters").is_dir()),
            _HERE.parents[2] / "shared" / "real-adapters")  # fmt: skip
ADAPTERS = {
    "peft-gpt2 (12 × c_attn, r8)": "peft-gpt2-seqcls-fanin",
    "mlx qwen2.5-0.5b (q,v, r8)": "mlx-lm-qwen2.5-0.5b",
    "diffusers sd1.5 unet (128, r4)": "diffusers-loradot-sd15-and-misconverted/2100-lora.safetensors",
}
LLAMA7B = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
           "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}  # fmt: skip


def total_error(source: Adapter, result: AlgebraResult) -> float:
    """√(Σ (rel_errorᵢ · ‖ΔWᵢ‖)² / Σ ‖ΔWᵢ‖²) from the per-module reports."""
    norms = {n: factored_frobenius(*_scaled(m)) for n, m in source.modules.items()}
    num = sum((r.rel_error * norms[r.module]) ** 2 for r in result.report)
    return math.sqrt(num / sum(v * v for v in norms.values()))


def _scaled(m: object) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = matrices(m)  # type: ignore[arg-type]
    return b * m.scale, a  # type: ignore[attr-defined]


def uniform_params(adapter: Adapter, rank: int) -> int:
    total = 0
    for m in adapter.modules.values():
        b, a = matrices(m)
        total += min(rank, m.rank, b.shape[0], a.shape[1]) * (b.shape[0] + a.shape[1])
    return total


def accuracy(root: Path, ranks: list[int]) -> None:
    print("| adapter | uniform rank | parameters | uniform rel. error | --budget rel. error | ratio | budget ranks |")
    print("|---|---|---|---|---|---|---|")
    for label, rel in ADAPTERS.items():
        path = root / rel
        if not path.exists():
            print(f"| {label} | missing: {path} | | | | | |")
            continue
        adapter = load_adapter(path)
        for r in ranks:
            params = uniform_params(adapter, r)
            uniform = total_error(adapter, resize(adapter, RankRule(rank=r)))
            chosen = resize_to_budget(adapter, params)
            budget = total_error(adapter, chosen)
            got = sorted(x.rank_out for x in chosen.report)
            ratio = f"{budget / uniform:.3f}" if uniform > 0 else "— (exact)"
            print(f"| {label} | {r} | {params:,} | {uniform:.4f} | {budget:.4f} | {ratio} | {got[0]}–{got[-1]} |")


def timing(root: Path, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    spectra, totals, costs = {}, {}, {}
    for layer in range(32):
        for name, (out, inp) in LLAMA7B.items():
            s2 = torch.rand(64, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 64, dtype=torch.float64)
            spectra[f"{layer}.{name}"] = sorted(s2.tolist(), reverse=True)
            totals[f"{layer}.{name}"] = float(s2.sum()) * 1.1
            costs[f"{layer}.{name}"] = out + inp
    budget = 16 * sum(costs.values())
    seconds, _ = timed(lambda: allocate(spectra, totals, costs, budget), repeats)
    print(f"\nallocate, Llama-7B shapes (224 modules, 64-deep spectra, budget {budget:,} = rank 16): {seconds:.3f} s")
    adapter = load_adapter(root / ADAPTERS["diffusers sd1.5 unet (128, r4)"])
    params = uniform_params(adapter, 2)
    t_uniform, _ = timed(lambda: resize(adapter, RankRule(rank=2)), repeats)
    t_budget, _ = timed(lambda: resize_to_budget(adapter, params), repeats)
    print(f"sd1.5 unet adapter, 128 modules: resize --rank 2 {t_uniform:.3f} s, --budget {params:,} "
          f"{t_budget:.3f} s ({t_budget / t_uniform:.2f}×)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=REAL)
    parser.add_argument("--ranks", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    accuracy(args.adapters, [int(r) for r in args.ranks.split(",")])
    timing(args.adapters, args.repeats)


if __name__ == "__main__":
    main()
