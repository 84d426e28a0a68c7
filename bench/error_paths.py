"""Whole-process time of errors that need no torch, and of a header-only `inspect` of an mlx `.npz`.

Usage: python bench/error_paths.py [--previous DIR] [--repeat 5]
Each case runs as a fresh process (`python -m loractl ...`), interleaved with the same case on an older
loractl tree (`--previous`, e.g. a `git archive` export) when given, and the medians print as a
Markdown table. This script never imports torch, so its children start clean.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QV = ROOT / "fixtures" / "adapters" / "tiny-qv"


def cases(tmp: Path) -> dict[str, list[str]]:
    """name → loractl arguments; every case but the npz one must fail with exit 2."""
    existing = tmp / "exists"
    existing.mkdir(exist_ok=True)
    npz = tmp / "adapters.npz"
    if not npz.exists():
        subprocess.run([sys.executable, "-m", "loractl", "convert", str(QV), "-o", str(tmp / "mlx"), "--to", "mlx"],
                       check=True, capture_output=True, env=_env(ROOT))  # fmt: skip
        subprocess.run([sys.executable, "-c", _NPZ, str(tmp / "mlx" / "adapters.safetensors"), str(npz)], check=True)
    return {
        "convert --to nope": ["convert", str(QV), "-o", str(tmp / "x"), "--to", "nope"],
        "convert, output exists": ["convert", str(QV), "-o", str(existing), "--to", "kohya"],
        "resize, missing input": ["resize", str(tmp / "missing"), "-o", str(tmp / "y"), "--rank", "4"],
        "inspect adapters.npz (headers)": ["inspect", str(npz), "--scale", "2"],
    }


# an mlx-examples style .npz holding the same arrays (numpy only)
_NPZ = """
import sys, numpy as np
from safetensors.numpy import load_file
np.savez(sys.argv[2], **load_file(sys.argv[1]))
"""


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


def _time(root: Path, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loractl", *args], env=_env(root), capture_output=True, cwd=root)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", help="an older loractl source tree, timed side by side")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    roots = {"this tree": ROOT, **({"previous": Path(args.previous).resolve()} if args.previous else {})}
    with tempfile.TemporaryDirectory() as d:
        argvs = cases(Path(d))
        runs: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):
            for case, argv in argvs.items():
                for label, root in roots.items():
                    runs.setdefault((case, label), []).append(_time(root, argv))
    print("| case | " + " | ".join(f"{label} s (median)" for label in roots) + " | ratio |")
    print("|---|" + "---|" * (len(roots) + 1))
    for case in argvs:
        medians = [statistics.median(runs[(case, label)]) for label in roots]
        ratio = f"{medians[1] / medians[0]:.1f}x faster" if len(medians) > 1 else ""
        print(f"| {case} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {ratio} |")


if __name__ == "__main__":
    main()
