"""A/B of `loractl merge` between two source trees: wall and CPU seconds, and the outputs compared.

    mkdir /tmp/before && git archive main | tar -x -C /tmp/before
    python -m bench.merge_ab BASE LORA --before /tmp/before --rounds 3

Each merge runs in its own child process (`PYTHONPATH` the tree's root, the CLI with its imports), the trees
alternated round after round, with a shared fingerprint cache warmed by one merge of each first (a merge that
hashes its base adds the hash's CPU beside it). Prints the medians of wall, user and system CPU seconds
(`os.wait4`), their ratios (after / before), the load average and CPU flags, and checks that the two trees wrote
the same bytes (SHA-256) and the same report figures (`--json`'s modules). The outputs are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.flux_merge import _machine

ROOT = Path(__file__).resolve().parent.parent


def _merge(root: Path, base: str, lora: str, out: Path, cache: Path) -> tuple[float, float, float, dict[str, object]]:
    """(wall, user CPU, system CPU seconds, the --json report) of one merge by the tree at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root), "LORACTL_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "loractl", "merge", base, lora, "-o", str(out), "--force", "--json"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed ({root}): {' '.join(cmd)}\n{stderr.read()[-2000:]}")
        return wall, usage.ru_utime, usage.ru_stime, json.loads(stdout.read())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("lora")
    p.add_argument("--before", required=True, type=Path, help="the other tree's root (e.g. main, git archive)")
    p.add_argument("--after", type=Path, default=ROOT, help="this tree by default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/merge-ab"), help="outputs and the fingerprint cache")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    outs = {k: args.work / f"{k}.safetensors" for k in trees}
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in trees}
    reports = {k: _merge(root, args.base, args.lora, outs[k], args.work / "cache")[3] for k, root in trees.items()}
    for _ in range(args.rounds):
        for k, root in trees.items():
            wall, user, system, _ = _merge(root, args.base, args.lora, outs[k], args.work / "cache")
            times[k].append((wall, user, system))
    same_bytes = _sha256(outs["before"]) == _sha256(outs["after"])
    same_figures = reports["before"]["modules"] == reports["after"]["modules"]
    for out in outs.values():
        out.unlink()
    load = os.getloadavg()
    med = {
        k: tuple(statistics.median(column) for column in (*zip(*v, strict=True), [u + s for _, u, s in v]))
        for k, v in times.items()
    }
    print(f"machine: {_machine()}; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"rounds: {args.rounds}; same bytes: {same_bytes}; same figures: {same_figures}")
    print("| tree | wall s | user s | sys s | user + sys s | runs (wall / user / sys) |\n|---|---|---|---|---|---|")
    for k, m in med.items():
        runs = ", ".join(f"{w:.1f}/{u:.1f}/{s:.1f}" for w, u, s in times[k])
        print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in m) + f" | {runs} |")
    ratios = " | ".join(f"{a / b:.3f}" for a, b in zip(med["after"], med["before"], strict=True))
    print(f"| after / before | {ratios} | |")
    if not (same_bytes and same_figures):
        raise SystemExit("the two trees differ")


if __name__ == "__main__":
    main()
