"""Time and memory of every reading command on the whole hostile corpus (issue 22, items 19–20).

    python bench/hostile.py [--work /tmp/hostile-bench]

Builds the seeded corpus of `tests/hostile_corpus.py` (big files included, about 2 GB written, much
of it sparse), runs inspect, validate, convert and merge on each file in one worker process
(`tests/hostile_worker.py`: heavy imports once, the memory high-water mark reset before each run),
and prints, per command, the slowest run and the largest peak memory a run added, with the cases
behind them: the figures against the goal of 5 s and 512 MB on any hostile file up to 100 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile_corpus import build  # noqa: E402
from test_hostile_input import WORKER, commands  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/loractl-hostile-bench")
    work = Path(parser.parse_args().work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    try:
        cases = build(work / "corpus", seed=0)
        runs = {tuple(argv): case for i, case in enumerate(cases) for argv in commands(case, work / "out" / str(i))}
        done = subprocess.run(
            [sys.executable, str(WORKER)], input=json.dumps(list(map(list, runs))), capture_output=True, text=True
        )
        results = [json.loads(line) for line in done.stdout.splitlines() if '"code"' in line]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(cases)} hostile files, {len(results)} runs (of {len(runs)})")
    print("| command | runs | slowest s | case | largest peak MB | case |")
    print("|---|---:|---:|---|---:|---|")
    for command in ("inspect", "validate", "convert", "merge"):
        mine = [r for r in results if r["argv"][0] == command]
        slow = max(mine, key=lambda r: r["seconds"])
        big = max(mine, key=lambda r: r["peak_mb"])
        name = lambda r: runs[tuple(r["argv"])].name  # noqa: E731
        print(
            f"| {command} | {len(mine)} | {slow['seconds']:.2f} | {name(slow)} | {big['peak_mb']:.0f} | {name(big)} |"
        )


if __name__ == "__main__":
    main()
