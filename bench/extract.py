"""Benchmark: loractl's truncated SVD of ΔW against kohya's and mergekit's full SVDs, same matrices, same run.

    python bench/extract.py                                   # 1024², 2048², 4096²; 4 spectra; r = 8, 16, 64
    python bench/extract.py --shapes 4096x4096,11008x4096 --spectra decaying --baselines 4096x4096
    python bench/extract.py --model                           # end-to-end extract of 7B-shaped layers, peak RSS

Per matrix and rank: seconds and error relative to the optimum (Eckart–Young: the tail of the
spectrum from the thin SVD, which is also mergekit's error) for
  * loractl   `linalg.truncated_svd` (randomized range finder, oversample max(10, r/2), 2 power iterations)
  * mergekit  `torch.linalg.svd(ΔW, full_matrices=False)` in float32, truncated (scripts/extract_lora.py)
  * kohya     `torch.linalg.svd(ΔW)` (full_matrices=True), truncated, U·S and Vh clamped to their
              0.99 quantile (networks/extract_lora_from_models.py, --clamp_quantile default)
Spectra: decaying (σᵢ ∝ 1/i), slow (1/√i), flat (a Gaussian matrix: Marchenko–Pastur, the hardest
for a sketch) and gap (rank 16 plus 1e-3 noise). Errors are accumulated in float64.
The whole-model line sums per-shape times over a 7B Llama (32 × q,k,v,o 4096², gate/up 11008×4096,
down 4096×11008); shapes whose full SVD was not run are extrapolated as d·k·min(d,k).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from timing import timed  # bench/timing.py (the script's own directory is on sys.path)

from loractl.ops import linalg

LLAMA_7B = {(4096, 4096): 4 * 32, (11008, 4096): 2 * 32, (4096, 11008): 1 * 32}


def spectral_matrix(d: int, k: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    """A d × k float32 matrix with the named kind of spectrum (exact values come from the thin SVD)."""
    g = torch.Generator().manual_seed(seed)
    n = min(d, k)
    if spectrum == "flat":
        return torch.randn(d, k, generator=g) / math.sqrt(k)
    if spectrum == "gap":
        low = torch.randn(d, 16, generator=g) @ torch.randn(16, k, generator=g) / math.sqrt(16 * k)
        return low + 1e-3 * torch.randn(d, k, generator=g) / math.sqrt(k)
    i = torch.arange(1, n + 1, dtype=torch.float32)
    s = 1.0 / i if spectrum == "decaying" else i.rsqrt()
    return (torch.randn(d, n, generator=g) * s) @ torch.randn(n, k, generator=g) / math.sqrt(d * k)


def error(m: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    return math.sqrt(linalg.residual_sq(m, b, a))


def kohya_clamp(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's post-processing: U·S and Vh truncated, then clamped to the 0.99 quantile of their entries."""
    us, v = u[:, :rank] * s[:rank], vh[:rank]
    dist = torch.cat([us.flatten(), v.flatten()])
    hi = torch.quantile(dist[torch.randperm(dist.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]], 0.99)
    return us.clamp(-hi, hi), v.clamp(-hi, hi)


def bench_matrix(
    d: int, k: int, spectrum: str, ranks: list[int], baselines: bool, repeats: int
) -> list[dict[str, Any]]:
    m = spectral_matrix(d, k, spectrum)
    rows: list[dict[str, Any]] = []
    t_thin, (u, s, vh) = timed(lambda: torch.linalg.svd(m, full_matrices=False))
    t_full, full = timed(lambda: torch.linalg.svd(m)) if baselines else (math.nan, None)
    tail = torch.cumsum(s.double().square().flip(0), 0).flip(0)  # tail[r] = Σ_{i≥r} σᵢ²
    for r in ranks:
        optimum = math.sqrt(float(tail[r])) if r < len(tail) else 0.0
        t_ours, trunc = timed(lambda r=r: linalg.truncated_svd(m, r), repeats)
        ours = error(m, *linalg.balanced_factors(trunc))
        row = {"shape": f"{d}x{k}", "spectrum": spectrum, "rank": r, "loractl_s": t_ours, "loractl_x": ours / optimum,
               "method": trunc.method, "mergekit_s": t_thin, "mergekit_x": error(m, u[:, :r] * s[:r], vh[:r]) / optimum}  # fmt: skip
        if full is not None:
            t_clamp, (us, v) = timed(lambda r=r: kohya_clamp(*full, r))
            row.update(kohya_s=t_full + t_clamp, kohya_x=error(m, us, v) / optimum)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| shape | spectrum | rank | loractl s | loractl ×opt | mergekit s | mergekit ×opt | kohya s | kohya ×opt | speed-up vs mergekit |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kohya = f"{r['kohya_s']:.2f} | {r['kohya_x']:.4f}" if "kohya_s" in r else "– | –"
        print(f"| {r['shape']} | {r['spectrum']} | {r['rank']} | {r['loractl_s']:.3f} | {r['loractl_x']:.4f} | "
              f"{r['mergekit_s']:.2f} | {r['mergekit_x']:.4f} | {kohya} | {r['mergekit_s'] / r['loractl_s']:.0f}× |")  # fmt: skip


def whole_model(rows: list[dict[str, Any]], rank: int) -> None:
    """7B sums: per-shape median loractl time at `rank`; full SVD measured or extrapolated as d·k·min(d,k)."""
    ours, thin = 0.0, 0.0
    spectrum = "decaying" if any(r["spectrum"] == "decaying" for r in rows) else rows[0]["spectrum"]
    known = {r["shape"]: r for r in rows if r["rank"] == rank and r["spectrum"] == spectrum}
    ref = max(known.values(), key=lambda r: math.prod(map(int, r["shape"].split("x"))))
    rd, rk = map(int, ref["shape"].split("x"))
    for (d, k), count in LLAMA_7B.items():
        row = known.get(f"{d}x{k}")
        scale = d * k * min(d, k) / (rd * rk * min(rd, rk))
        ours += count * (row["loractl_s"] if row else ref["loractl_s"] * d * k / (rd * rk))
        thin += count * (row["mergekit_s"] if row else ref["mergekit_s"] * scale)
    print(f"\n7B Llama (224 matrices, {spectrum} spectrum) at rank {rank}: loractl {ours:.0f} s, mergekit-style thin SVD {thin / 60:.0f} min "
          f"({thin / ours:.0f}×); shapes not in the run are extrapolated from {ref['shape']}")  # fmt: skip


MODEL_CHILD = """
import resource, sys, time
from loractl.ops.extract import ExtractConfig, extract
start = time.perf_counter()
report = extract(sys.argv[1], sys.argv[2], sys.argv[3], ExtractConfig(rank=int(sys.argv[4])))
print(f"{time.perf_counter() - start:.2f} {report.totals()['rel_error']:.3e}")
"""
LAUNCHER_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
LAUNCHER = """
import resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout.split()
print(out[0], out[1], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def bench_model(layers: int, rank: int) -> None:
    """End-to-end `extract` of `layers` 7B-shaped Llama layers in bf16 (I/O, ΔW, SVD, report, writing).

    Run in a child of a torch-free launcher, so the child's peak RSS is its own (PERF.md pitfalls).
    """
    from loractl.io.safetensors_writer import save_tensors

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
              "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("base", "ft"):
            tensors = {}
            for i in range(layers):
                for name, (d, k) in shapes.items():
                    w = torch.randn(d, k, generator=torch.Generator().manual_seed(hash((i, name)) % 2**31)) * 0.02
                    if which == "ft":  # ‖ΔW‖/‖W0‖ ≈ 0.1, plus the bf16 rounding of both checkpoints
                        w += spectral_matrix(d, k, "decaying", seed=i) * 0.1 * math.sqrt(d * k) * 0.02 / 1.28
                    tensors[f"model.layers.{i}.{name}.weight"] = w.to(torch.bfloat16)
            Path(tmp, which).mkdir()
            save_tensors(Path(tmp, which, "model.safetensors"), tensors)
            del tensors
        cmd = [sys.executable, "-c", MODEL_CHILD, f"{tmp}/base", f"{tmp}/ft", f"{tmp}/out", str(rank)]
        seconds, err, rss_kb = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True,
                                              check=True).stdout.split()  # fmt: skip
        imports = [sys.executable, "-c", "import loractl.ops.extract, loractl.formats"]
        base_kb = subprocess.run([sys.executable, "-c", LAUNCHER_RSS, *imports], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
    largest_f32 = 11008 * 4096 * 4 / 2**20
    print(f"end-to-end extract of {layers} 7B-shaped layer(s) ({7 * layers} matrices, bf16), rank {rank}: "
          f"{float(seconds):.1f} s, rel error {err}, peak RSS {int(rss_kb) / 1024:.0f} MiB "
          f"(after imports alone: {int(base_kb) / 1024:.0f} MiB; largest ΔW in float32: {largest_f32:.0f} MiB)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x1024,2048x2048,4096x4096")
    p.add_argument("--spectra", default="decaying,slow,flat,gap")
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--baselines", default="all", help="shapes that also run kohya's full SVD ('all' or a list)")
    p.add_argument("--repeats", type=int, default=3, help="loractl repeats (median); the full SVDs run once")
    p.add_argument("--model", action="store_true", help="also run the end-to-end extract with peak RSS")
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        d, k = map(int, shape.split("x"))
        for spectrum in args.spectra.split(","):
            baselines = args.baselines == "all" or shape in args.baselines.split(",")
            rows += bench_matrix(d, k, spectrum, ranks, baselines, args.repeats)
            print(f"  done {shape} {spectrum}", file=sys.stderr)
    print_table(rows)
    whole_model(rows, max(ranks))
    if args.model:
        bench_model(args.layers, max(ranks))


if __name__ == "__main__":
    main()
