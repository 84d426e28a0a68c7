"""Benchmark: CPU per GB of a base fingerprint's read-and-hash loop, by the size of the buffer it reads into.

    python -m bench.hash_block FILE [--gb 3] [--rounds 2]

`Checkpoint.row_chunks` reads a tensor's rows into one reused buffer (`os.preadv`) and SHA-256 hashes it.
The kernel's copy writes the buffer and the hash reads it back: a buffer that fits a core's L2 cache is read
back from there, a larger one from memory (a 16 MB buffer cost 1.4–1.6× the CPU per byte of a 1 MB one on machine C).
This times that loop alone over the first `--gb` GB of FILE (any large file, e.g. the Flux base of
`bench/flux_merge.py`), warmed into the page cache first, for each buffer size in turn, `--rounds` times,
and prints wall, user and system seconds per GB (`getrusage`) with the machine's CPU flags and cache sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import time

from bench.flux_merge import _machine

SIZES = (1 << 24, 1 << 22, 1 << 20, 1 << 19)


def _hash(fd: int, nbytes: int, block: int) -> tuple[float, float, float]:
    """(wall, user, system) seconds to read and hash `nbytes` of `fd` through one buffer of `block` bytes."""
    buf, digest = memoryview(bytearray(block)), hashlib.sha256()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for offset in range(0, nbytes, block):
        n = os.preadv(fd, [buf], offset)
        digest.update(buf[:n])
    after = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - start, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--gb", type=float, default=3.0, help="GB of the file read (it should fit the page cache)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    cache = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    print(_machine(), *(" ".join(line.split()) for line in cache if "cache" in line), sep="\n")
    fd = os.open(args.file, os.O_RDONLY)
    nbytes = min(int(args.gb * 1e9), os.fstat(fd).st_size)
    _hash(fd, nbytes, SIZES[0])  # into the page cache
    gb = nbytes / 1e9
    print(f"{'buffer':>8} {'wall s/GB':>10} {'user s/GB':>10} {'sys s/GB':>10} {'CPU s/GB':>10}")
    for _ in range(args.rounds):
        for block in SIZES:
            wall, user, sys_ = (seconds / gb for seconds in _hash(fd, nbytes, block))
            print(f"{block >> 10:>5} KB {wall:>10.3f} {user:>10.3f} {sys_:>10.3f} {user + sys_:>10.3f}")


if __name__ == "__main__":
    main()
