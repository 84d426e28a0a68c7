"""Load: one `loractl validate` call over 1,000 adapters, some broken, in bounded memory.

The real entry point runs in a subprocess under a small wrapper that reports the peak RSS
of its one child, so the figure is the validate process's own. Memory must not grow with
the number of adapters: the peak for 1,000 is compared with the peak for 10, and both with
an absolute bound. The `--json` document must parse and account for every path, failing
ones included. (About 20 s on 2 busy cores, most of it two interpreter starts: not `slow`.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES

COUNT = 1000
BROKEN_EVERY = 10  # one adapter in ten is truncated, garbage or lying about its config
_PEAK_RSS = r"""
import resource, subprocess, sys
run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(run.stderr)
sys.stdout.write(run.stdout)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)
sys.exit(run.returncode)
"""


def _adapters(root: Path, count: int) -> tuple[list[Path], set[Path]]:
    """`count` small PEFT adapters (copies of tiny-qv); every `BROKEN_EVERY`-th is broken in one of three ways."""
    source = FIXTURES / "adapters" / "tiny-qv"
    paths, broken = [], set()
    for i in range(count):
        path = shutil.copytree(source, root / f"a{i:04d}")
        paths.append(path)
        if i % BROKEN_EVERY != BROKEN_EVERY - 1:
            continue
        broken.add(path)
        weights = path / "adapter_model.safetensors"
        kind = (i // BROKEN_EVERY) % 3
        if kind == 0:
            weights.write_bytes(weights.read_bytes()[: 100 + i])
        elif kind == 1:
            weights.write_bytes(b"\x00" * 64)
        else:
            config = json.loads((path / "adapter_config.json").read_text())
            (path / "adapter_config.json").write_text(json.dumps({**config, "r": -1}))
    return paths, broken


def _validate(paths: list[Path]) -> tuple[int, dict[str, object], int]:
    """(exit code, the --json document, peak RSS in bytes) of one `loractl validate` process."""
    argv = [sys.executable, "-m", "loractl", "validate", "--json", *map(str, paths)]
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS, *argv], capture_output=True, text=True, timeout=600)
    peak = int(run.stderr.strip().splitlines()[-1])
    return run.returncode, json.loads(run.stdout), peak


def test_validate_a_thousand_adapters_in_bounded_memory(tmp_path: Path) -> None:
    paths, broken = _adapters(tmp_path, COUNT)
    code, doc, peak = _validate(paths)
    small_code, _, small_peak = _validate(paths[:BROKEN_EVERY])
    assert code == 1 and small_code == 1 and doc["ok"] is False
    reports = doc["reports"]
    assert isinstance(reports, list) and [r["path"] for r in reports] == list(map(str, paths))
    failed = {Path(r["path"]) for r in reports if any(f["severity"] == "error" for f in r["findings"])}
    assert failed == broken
    assert all(r["content_hash"] for r in reports if Path(r["path"]) not in broken)
    assert peak < 1 << 30, f"peak RSS {peak >> 20} MiB"
    assert peak - small_peak < 64 << 20, f"memory grows with the adapter count: {small_peak >> 20} → {peak >> 20} MiB"
