"""Benchmark: CPU per GB of a base fingerprint, by the size of the chunk it reads each tensor in.

    python -m bench.hash_block BASE.safetensors [--gb 3] [--rounds 2]

`Checkpoint.fingerprint` reads a tensor's rows `checkpoint.HASH_BLOCK` bytes at a time into one reused buffer
(`Checkpoint.row_chunks`) and SHA-256 hashes it. The kernel's copy writes the buffer and the hash reads it back:
a buffer that fits a core's L2 cache is read back from there, a larger one from memory (16 MB chunks cost
1.4–1.6× the CPU per byte of 1 MB ones on machine C). This takes the per-tensor fingerprint of the file's first
tensors, `--gb` GB of them in storage order (warmed into the page cache first), with `HASH_BLOCK` set to each size
in turn, `--rounds` times, and prints wall, user and system seconds per GB (`getrusage`) with the machine's CPU
flags and cache sizes. Any safetensors file works, e.g. the Flux base of `bench/flux_merge.py`.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time

from bench.flux_merge import _machine
from loractl.io import checkpoint

SIZES = (1 << 24, 1 << 22, 1 << 20, 1 << 19)


def _hash(ckpt: checkpoint.Checkpoint, names: list[str], block: int) -> tuple[float, float, float]:
    """(wall, user, system) seconds of `names`' fingerprint read in chunks of `block` bytes."""
    checkpoint.HASH_BLOCK = block
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    ckpt.fingerprint(names, fresh=True, scheme=checkpoint.PER_TENSOR)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - start, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("--gb", type=float, default=3.0, help="GB of tensors hashed (they should fit the page cache)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.environ["LORACTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="hash-block-")  # never the user's fingerprint cache
    cache = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    print(_machine(), *(" ".join(line.split()) for line in cache if "cache" in line), sep="\n")
    with checkpoint.Checkpoint(args.base) as ckpt:
        names, nbytes = [], 0
        for name in sorted(ckpt.names, key=ckpt.position):
            if nbytes >= args.gb * 1e9:
                break
            names.append(name)
            nbytes += ckpt.info(name).nbytes
        _hash(ckpt, names, SIZES[0])  # into the page cache
        gb = nbytes / 1e9
        print(f"{len(names)} tensors, {gb:.2f} GB")
        print(f"{'chunk':>8} {'wall s/GB':>10} {'user s/GB':>10} {'sys s/GB':>10} {'CPU s/GB':>10}")
        for _ in range(args.rounds):
            for block in SIZES:
                wall, user, sys_ = (seconds / gb for seconds in _hash(ckpt, names, block))
                print(f"{block >> 10:>5} KB {wall:>10.3f} {user:>10.3f} {sys_:>10.3f} {user + sys_:>10.3f}")


if __name__ == "__main__":
    main()
