"""`loractl train --nproc N`: the same command re-run under torchrun, N processes on this machine.

torchrun is started quiet: no OMP_NUM_THREADS banner (it is set to torchrun's default, 1, when unset),
no logs, no traceback when a process fails (that process's own `error:` line says why, and the exit
code is its exit code); `loractl --debug` keeps all of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from ..errors import LoractlError

COMMAND_ARGS = "loractl.command_args"  # ctx.meta key: the arguments after the command's name, as given

# torchrun's main, quiet, with a failed child's exit code instead of torchrun's logs and traceback
# (LORACTL_DEBUG=1 keeps them)
_TORCHRUN = """import logging, os, sys
debug = os.environ.get("LORACTL_DEBUG") == "1"
if not debug:
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
if not debug:
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    if debug:
        raise
    sys.exit(max(1, e.get_first_failure()[1].exitcode))
"""


def launch(nproc: int, train_args: Sequence[str], *, debug: bool = False) -> int:
    """Run `loractl train TRAIN_ARGS` (`--nproc` removed) under `torchrun --standalone`; its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env |= {"LORACTL_DEBUG": "1"} if debug else {}
    cmd = [sys.executable, "-c", _TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "loractl", "train",
           *without_nproc(train_args)]  # fmt: skip
    try:
        return subprocess.call(cmd, env=env)
    except OSError as e:
        raise LoractlError(f"cannot start torchrun: {e.strerror}", hint="run torchrun yourself") from None


def without_nproc(args: Sequence[str]) -> list[str]:
    """`args` without `--nproc N` / `--nproc=N` (each process is one of the N)."""
    out, skip = [], False
    for arg in args:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        out.append(arg)
    return out
