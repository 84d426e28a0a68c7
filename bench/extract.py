"""Benchmark: loractl's truncated SVD of ΔW against kohya's and mergekit's full SVDs, same matrices, same run.

    python bench/extract.py                                   # 1024², 2048², 4096²; 4 spectra; r = 8, 16, 64
    python bench/extract.py --shapes 4096x4096,11008x4096 --spectra decaying --baselines 4096x4096
    python bench/extract.py --model-only --layers 4 --ranks 64  # end-to-end extract of 7B-shaped layers, peak RSS,
                                                              # against `cat` of both checkpoints (the I/O floor)

Per matrix and rank: seconds and error relative to the optimum (Eckart–Young: the tail of the
spectrum from the thin SVD, which is also mergekit's error) for
  * loractl   `linalg.truncated_svd` (randomized subspace iteration, checked after every pass over ΔW)
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
import importlib.util
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    d: int, k: int, spectrum: str, ranks: list[int], baselines: bool, repeats: int, previous: Any = None
) -> list[dict[str, Any]]:
    m = spectral_matrix(d, k, spectrum)
    rows: list[dict[str, Any]] = []
    t_thin, (u, s, vh) = timed(lambda: torch.linalg.svd(m, full_matrices=False))
    t_full, full = timed(lambda: torch.linalg.svd(m)) if baselines else (math.nan, None)
    tail = torch.cumsum(s.double().square().flip(0), 0).flip(0)  # tail[r] = Σ_{i≥r} σᵢ²
    for r in ranks:
        optimum = math.sqrt(float(tail[r])) if r < len(tail) else 0.0
        contenders = {"loractl": linalg} | ({"previous": previous} if previous is not None else {})
        times, results = interleaved({n: (lambda r=r, mod=mod: mod.truncated_svd(m, r)) for n, mod in contenders.items()}, repeats)  # fmt: skip
        trunc = results["loractl"]
        ours = error(m, *linalg.balanced_factors(trunc))
        row = {"shape": f"{d}x{k}", "spectrum": spectrum, "rank": r, "loractl_s": times["loractl"], "loractl_x": ours / optimum,
               "method": trunc.method, "passes": trunc.passes, "mergekit_s": t_thin,
               "mergekit_x": error(m, u[:, :r] * s[:r], vh[:r]) / optimum}  # fmt: skip
        if previous is not None:
            prev = results["previous"]
            row.update(previous_s=times["previous"], previous_x=error(m, *linalg.balanced_factors(prev)) / optimum)
        if full is not None:
            t_clamp, (us, v) = timed(lambda r=r: kohya_clamp(*full, r))
            row.update(kohya_s=t_full + t_clamp, kohya_x=error(m, us, v) / optimum)
        rows.append(row)
    return rows


def interleaved(fns: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function, run in turn `repeats` times (a load change hits all alike)."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, results[name] = timed(fn)
            times[name].append(t)
    return {n: statistics.median(t) for n, t in times.items()}, results


def load_previous(path: str) -> Any:
    """A linalg.py of another revision, imported under its own name (it imports nothing of loractl)."""
    spec = importlib.util.spec_from_file_location("previous_linalg", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def print_table(rows: list[dict[str, Any]]) -> None:
    prev = "previous_s" in rows[0]
    print("| shape | spectrum | rank | loractl s | passes | loractl ×opt | mergekit s | mergekit ×opt | kohya s | kohya ×opt "
          "| speed-up vs mergekit |" + (" previous s | previous ×opt | new vs previous |" if prev else ""))  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if prev else ""))
    for r in rows:
        kohya = f"{r['kohya_s']:.2f} | {r['kohya_x']:.4f}" if "kohya_s" in r else "– | –"
        line = (f"| {r['shape']} | {r['spectrum']} | {r['rank']} | {r['loractl_s']:.3f} | {r['passes']} | {r['loractl_x']:.4f} | "
                f"{r['mergekit_s']:.2f} | {r['mergekit_x']:.4f} | {kohya} | {r['mergekit_s'] / r['loractl_s']:.0f}× |")  # fmt: skip
        if prev:
            line += f" {r['previous_s']:.3f} | {r['previous_x']:.4f} | {r['previous_s'] / r['loractl_s']:.2f}× |"
        print(line)


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


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def bench_model(layers: int, rank: int, repeats: int = 1, previous_tree: str | None = None) -> None:
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
        shards = [str(p) for p in sorted(Path(tmp).glob("*/*.safetensors"))]
        size = sum(Path(p).stat().st_size for p in shards) / 1e9
        cat = statistics.median(_wall(["cat", *shards]) for _ in range(3))
        cmd = [sys.executable, "-c", MODEL_CHILD, f"{tmp}/base", f"{tmp}/ft", f"{tmp}/out", str(rank)]
        trees = {"this": os.environ.get("PYTHONPATH", "")} | ({"previous": previous_tree} if previous_tree else {})
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
        for _ in range(repeats):
            for name, tree in trees.items():  # interleaved: a change of load hits both alike
                shutil.rmtree(f"{tmp}/out", ignore_errors=True)
                start = time.perf_counter()
                seconds, err, rss_kb = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True,
                                                      text=True, check=True, env={**os.environ, "PYTHONPATH": tree}).stdout.split()  # fmt: skip
                runs[name].append((time.perf_counter() - start, float(seconds), int(rss_kb) / 1024))
                print(f"  {name}: {runs[name][-1][0]:.1f} s, rel error {err}", file=sys.stderr)
        imports = [sys.executable, "-c", "import loractl.ops.extract, loractl.formats"]
        base_kb = subprocess.run([sys.executable, "-c", LAUNCHER_RSS, *imports], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
    print(f"`cat` of both checkpoints ({size:.2f} GB) to /dev/null: {cat:.2f} s (median of 3)")
    for name, rs in runs.items():
        wall, inside = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
        print(f"whole `extract` process ({name}): {wall:.1f} s (median of {repeats}: {', '.join(f'{r[0]:.1f}' for r in rs)}), "
              f"inside `extract()` {inside:.1f} s; {wall / cat:.1f}× cat; × {32 / layers:g} for 32 layers: {wall * 32 / layers:.0f} s")  # fmt: skip
    largest_f32 = 11008 * 4096 * 4 / 2**20
    print(f"{7 * layers} matrices (bf16), rank {rank}; peak RSS " + ", ".join(f"{n} {max(r[2] for r in rs):.0f} MiB" for n, rs in runs.items())
          + f" (after imports alone: {int(base_kb) / 1024:.0f} MiB; largest ΔW in float32: {largest_f32:.0f} MiB)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x1024,2048x2048,4096x4096")
    p.add_argument("--spectra", default="decaying,slow,flat,gap")
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--baselines", default="all", help="shapes that also run kohya's full SVD ('all' or a list)")
    p.add_argument("--repeats", type=int, default=3, help="loractl repeats (median); the full SVDs run once")
    p.add_argument(
        "--previous",
        help="a linalg.py of another revision to time interleaved with this one "
        "(git show REV:loractl/ops/linalg.py > FILE)",
    )
    p.add_argument("--model", action="store_true", help="also run the end-to-end extract with peak RSS")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument(
        "--previous-tree",
        help="a directory holding another revision's loractl/ "
        "(git archive REV loractl | tar -x -C DIR), run interleaved in the end-to-end extract",
    )
    p.add_argument("--model-only", action="store_true", help="only the end-to-end extract")
    p.add_argument("--model-repeats", type=int, default=1, help="whole-process extract runs (median)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    ranks = [int(r) for r in args.ranks.split(",")]
    previous = load_previous(args.previous) if args.previous else None
    if args.model_only:
        bench_model(args.layers, max(ranks), args.model_repeats, args.previous_tree)
        return
    rows = []
    for shape in args.shapes.split(","):
        d, k = map(int, shape.split("x"))
        for spectrum in args.spectra.split(","):
            baselines = args.baselines == "all" or shape in args.baselines.split(",")
            rows += bench_matrix(d, k, spectrum, ranks, baselines, args.repeats, previous)
            print(f"  done {shape} {spectrum}", file=sys.stderr)
    print_table(rows)
    whole_model(rows, max(ranks))
    if args.model:
        bench_model(args.layers, max(ranks), args.model_repeats, args.previous_tree)


if __name__ == "__main__":
    main()
