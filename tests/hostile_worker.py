"""Run loractl commands in this process, one after another, measuring each: `python hostile_worker.py < runs.json`.

Reads a JSON list of argument lists on stdin; prints one JSON line per run, flushed as it ends:
exit code, stdout, stderr, wall seconds and the peak resident memory the run added (the
kernel's high-water mark is reset before each run, so runs do not hide behind one another).
Heavy imports happen once, before the first run, so that a run's time is the command's own.
A run still going after `HANG_S` is stopped by an alarm and reported as a hang; the address
space is capped so that a run allocating gigabytes fails here instead of on the machine.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

HANG_S = int(os.environ.get("HOSTILE_HANG_S", "30"))
SPARE_BYTES = 6 << 30  # room for a 4 GiB sparse file mapped whole


class Hang(BaseException):
    """Raised by the alarm: not an `Exception`, so that no handler in loractl swallows it."""


def _status(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def _on_alarm(signum: int, frame: object) -> None:
    raise Hang


def run(argv: list[str]) -> dict[str, object]:
    """One command through `loractl.cli.main`, as the console script runs it, measured."""
    from click.testing import CliRunner

    from loractl.cli import main

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS:")
    start = time.perf_counter()
    signal.alarm(HANG_S)
    with CliRunner().isolation() as (out, err, _):
        try:
            main(argv)
            code: object = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Hang:
            code = "hang"
        except BaseException as e:  # reported, not hidden: any escape is the finding
            code = f"escaped {type(e).__name__}: {str(e)[:200]}"
        finally:
            signal.alarm(0)
        sys.stdout.flush()
        sys.stderr.flush()
        seconds = time.perf_counter() - start
        result = {"argv": argv, "code": code, "stdout": out.getvalue().decode(errors="replace")}
        result["stderr"] = err.getvalue().decode(errors="replace")
    return result | {"seconds": seconds, "peak_mb": (_status("VmHWM:") - before) / 2**20}


def main() -> None:
    import gguf  # noqa: F401 - imported once here, not inside the first timed run
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import loractl.cli  # noqa: F401

    runs = json.load(sys.stdin)
    vm = _status("VmSize:")
    resource.setrlimit(resource.RLIMIT_AS, (vm + SPARE_BYTES, vm + SPARE_BYTES))
    signal.signal(signal.SIGALRM, _on_alarm)
    for argv in runs:
        print(json.dumps({"start": argv}), flush=True)
        print(json.dumps(run(argv)), flush=True)


if __name__ == "__main__":
    main()
