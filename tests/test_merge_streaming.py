"""merge at the physical limit: row blocks through the writer thread, kernel copies, bounded memory,
the rounding loss report (issue 16 item 6) and --device.

The memory test merges a checkpoint holding one tensor far larger than the cap; the file is
sparse (a header, then a hole), so it costs no disk and little time to make.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loractl.adapter import Adapter, LoraModule
from loractl.errors import NumericError, UsageError
from loractl.io.checkpoint import Checkpoint
from loractl.ops import merge_kernel
from loractl.ops.merge import RECORD_NAME, ROUNDING_WARN, merge
from tests.helpers import random_module, raw, run_cli, save, tensors, tiny_base

ROOT = Path(__file__).resolve().parent.parent
CAP = 512 * 10**6  # the peak-RSS goal, whatever the tensor size


def test_many_blocks_through_the_pool_match_the_dense_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of 4 rows (`MIN_ROWS`, the fewest): every tensor crosses the 4-buffer pool many times, in order."""
    monkeypatch.setattr(merge_kernel, "BLOCK_ELEMENTS", 3 * 40)
    shapes = {"a.weight": (50, 40), "b.weight": (31, 40), "c.weight": (7, 40), "n.weight": (40,)}
    base = tiny_base(tmp_path / "base", shapes, dtype=torch.bfloat16)
    mods = {"a": random_module(50, 40, 4, seed=1), "b": random_module(31, 40, 2, seed=2)}
    out = merge(base, [save(Adapter(modules=mods), tmp_path / "ad")], tmp_path / "out").output
    w0, got = tensors(base), tensors(out)
    for name, m in mods.items():
        want = (w0[f"{name}.weight"].double() + m.scale * (m.B.double() @ m.A.double())).to(torch.bfloat16)
        mismatches = int((got[f"{name}.weight"] != want).sum())
        assert mismatches <= 2, mismatches  # float32 vs float64 sums can round a tie the other way
    before, after = raw(base), raw(out)
    assert before["c.weight"] == after["c.weight"] and before["n.weight"] == after["n.weight"]


def test_untouched_tensors_are_byte_copies_with_or_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = {"a.weight": (64, 32), "b.weight": (300, 32), "n.weight": (32,)}
    base = tiny_base(tmp_path / "base", shapes)
    adapter = save(Adapter(modules={"a": random_module(64, 32, 2)}), tmp_path / "ad")
    kernel = merge(base, [adapter], tmp_path / "kernel").output
    calls: list[int] = []

    def refuse(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    by_hand = merge(base, [adapter], tmp_path / "by-hand").output
    assert calls, "the fallback was not exercised"
    for f in kernel.iterdir():
        assert (by_hand / f.name).read_bytes() == f.read_bytes(), f.name
    assert raw(kernel)["b.weight"] == raw(base)["b.weight"]


def test_a_nan_in_a_copied_base_tensor_fails_and_writes_nothing(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", {"a.weight": (8, 4), "b.weight": (8, 4)})
    data = tensors(base)
    data["b.weight"][3, 1] = math.nan
    from loractl.io.safetensors_writer import save_tensors

    save_tensors(base / "model.safetensors", data)
    adapter = save(Adapter(modules={"a": random_module(8, 4, 2)}), tmp_path / "ad")
    with pytest.raises(NumericError, match=r"base tensor 'b\.weight' contains NaN"):
        merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "tmp" in p.name]


# ---------------------------------------------------------------- rounding loss (issue 16, item 6)


def _rounding_reference(w0: torch.Tensor, merged: torch.Tensor, delta: torch.Tensor) -> float:
    """‖round(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F in float64, from the written tensor."""
    exact = w0.double() + delta
    return float((merged.double() - exact).norm() / delta.norm())


@pytest.mark.parametrize("size", [1e-3, 3e-2])
def test_rounding_loss_matches_a_float64_reference(tmp_path: Path, size: float) -> None:
    base = tiny_base(tmp_path / "base", {"m.weight": (96, 64), "k.weight": (32, 64)}, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    mods = {
        n: LoraModule(A=torch.randn(4, 64, generator=g) * size, B=torch.randn(r, 4, generator=g), scale=1.0, alpha=4.0)
        for n, r in (("m", 96), ("k", 32))
    }
    report = merge(base, [save(Adapter(modules=mods), tmp_path / "ad")], tmp_path / "out")
    w0, got = tensors(base), tensors(tmp_path / "out")
    for m in report.modules:
        mod = mods[m.module]
        want = _rounding_reference(w0[m.tensor], got[m.tensor], mod.B.double() @ mod.A.double())
        assert m.rounding_loss == pytest.approx(want, rel=1e-3)
    losses = sorted(m.rounding_loss or 0.0 for m in report.modules)
    assert report.rounding == {
        "median": pytest.approx(losses[1], rel=1e-5),
        "worst": pytest.approx(losses[-1], rel=1e-5),
    }
    record = json.loads((tmp_path / "out" / RECORD_NAME).read_text())
    assert record["rounding_loss"] == report.rounding
    assert {m["module"]: m["rounding_loss"] for m in record["modules"]}.keys() == {"m", "k"}
    assert bool(report.warnings) == (losses[-1] > ROUNDING_WARN)


def test_a_tiny_update_into_bfloat16_warns_and_float32_loses_nothing(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", {"m.weight": (64, 64)}, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    tiny = LoraModule(A=torch.randn(2, 64, generator=g) * 1e-4, B=torch.randn(64, 2, generator=g), scale=1.0, alpha=2.0)
    adapter = save(Adapter(modules={"m": tiny}), tmp_path / "ad")
    code, out, err = run_cli("merge", base, adapter, "-o", tmp_path / "bf16", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["rounding_loss"]["worst"] > ROUNDING_WARN
    assert "--dtype float32" in doc["warnings"][0] and "--dtype float32" in err
    code, out, err = run_cli("merge", base, adapter, "-o", tmp_path / "f32", "--dtype", "float32", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["rounding_loss"] == {"median": 0.0, "worst": 0.0} and doc["warnings"] == []
    code, out, _ = run_cli("merge", base, adapter, "-o", tmp_path / "text")
    assert code == 0 and "rounding" in out


# ---------------------------------------------------------------- --device


def test_device_auto_and_cpu_give_the_same_bytes_and_unknown_devices_are_refused(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", {"m.weight": (40, 24)}, dtype=torch.bfloat16)
    adapter = save(Adapter(modules={"m": random_module(40, 24, 3)}), tmp_path / "ad")
    cpu = merge(base, [adapter], tmp_path / "cpu", device="cpu").output
    auto = merge(base, [adapter], tmp_path / "auto", device="auto").output
    assert raw(cpu) == raw(auto)
    with pytest.raises(UsageError, match="unknown device"):
        merge(base, [adapter], tmp_path / "x", device="tpu")
    if not torch.cuda.is_available():
        code, _, err = run_cli("merge", base, adapter, "-o", tmp_path / "y", "--device", "cuda")
        assert code != 0 and "no CUDA GPU" in err and not (tmp_path / "y").exists()


# ---------------------------------------------------------------- memory


def _sparse_base(path: Path, rows: int, cols: int) -> Path:
    """A bf16 checkpoint: one (rows, cols) tensor of zeros as a hole on disk, and a small one."""
    path.mkdir(parents=True)
    big = rows * cols * 2
    header = {
        "big.weight": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, big]},
        "small.weight": {"dtype": "BF16", "shape": [8, cols], "data_offsets": [big, big + 16 * cols]},
    }
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    with (path / "model.safetensors").open("wb") as f:
        f.write(len(raw_header).to_bytes(8, "little") + raw_header)
        f.truncate(8 + len(raw_header) + big + 16 * cols)
    return path


_CHILD = """
import sys
import torch
from loractl.ops.merge import merge

def peak():  # VmHWM: this address space's own peak; ru_maxrss would start at the forking pytest's RSS
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

print(peak())
merge(sys.argv[1], [sys.argv[2]], sys.argv[3])
print(peak())
"""
GROWTH = (
    128 * 2**20
)  # what the merge may add to the process: ~4 pool blocks, float32 blocks, a 16 MB hash chunk, threads


def _peak_rss_of_merge(base: Path, adapter: Path, out: Path) -> tuple[int, int]:
    """(peak RSS with torch and loractl imported, peak RSS after the merge) of a fresh child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(base), str(adapter), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = done.stdout.split()[-2:]
    return int(before), int(after)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize(
    "rows", [pytest.param(16384, id="0.27GB"), pytest.param(128256, id="2.1GB", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("adapted", [True, False], ids=["adapted", "untouched"])
def test_peak_memory_stays_under_the_cap_whatever_the_tensor_size(tmp_path: Path, rows: int, adapted: bool) -> None:
    """A (rows, 8192) bf16 tensor, as large as Llama-3-70B's embedding at 128,256 rows: peak RSS of
    the whole merging process stays under 512 MB, and the merge adds less than `GROWTH` to what
    importing torch costs (one buffer of the tensor would be 268 MB at the default size)."""
    cols = 8192
    base = _sparse_base(tmp_path / "base", rows, cols)
    name = "big" if adapted else "small"
    module = random_module(rows if adapted else 8, cols, 4, seed=1)
    adapter = save(Adapter(modules={name: module}), tmp_path / "ad")
    imported, peak = _peak_rss_of_merge(base, adapter, tmp_path / "out")
    assert peak < CAP and peak - imported < GROWTH, (imported, peak)
    from loractl.ops.merge_io import ReusingReader

    with Checkpoint(tmp_path / "out") as ckpt, ReusingReader(ckpt) as reader:
        assert ckpt.info("big.weight").shape == (rows, cols)
        m = module if adapted else None
        for start in (0, rows - 64):  # first and last rows: W = 0, so W' = round(scale · B · A)
            got = reader.rows("big.weight", start, start + 64).clone()
            want = (
                torch.zeros(64, cols) if m is None else (m.scale * (m.B[start : start + 64] @ m.A)).to(torch.bfloat16)
            )
            assert int((got.float() != want.float()).sum()) <= 64 * cols // 1000  # rounding ties only
        small = reader.rows("small.weight", 0, 8).float()
        want_small = (
            torch.zeros(8, cols) if m is not None else (module.scale * (module.B @ module.A)).bfloat16().float()
        )
        assert int((small != want_small).sum()) <= 8 * cols // 1000


def test_the_write_queue_keeps_order_raises_the_first_error_and_still_closes(tmp_path: Path) -> None:
    from loractl.io.write_queue import WriteQueue

    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    closed: list[int] = []
    with WriteQueue(block_bytes=8, pool=2) as q:
        for i in range(6):  # more blocks than buffers: each waits for a written one to come back
            buf = q.buffer(8)
            buf.fill_(i)
            q.write(fd, buf[:8], buf)
        q.drain()
        assert path.read_bytes() == bytes(i for i in range(6) for _ in range(8))
        q.write(-1, torch.zeros(4, dtype=torch.uint8))  # a bad descriptor: the thread's error
        with contextlib.suppress(OSError):  # raised here if the thread met the error already, else skipped
            q.call(lambda: closed.append(1))
        q.call(lambda: (os.close(fd), closed.append(2)), always=True)  # a close always runs
        with pytest.raises(OSError):
            q.drain()
        with pytest.raises(OSError):
            q.buffer(8)
    assert closed == [2]


def test_a_stopped_fingerprint_is_abandoned(tmp_path: Path) -> None:
    """The merge hashes the base beside its work; once that work fails it stops the hash, not waits for it."""
    base = tiny_base(tmp_path / "base", {"a.weight": (8, 4)})
    with Checkpoint(base) as ckpt:
        assert ckpt.fingerprint(["a.weight"], stop=lambda: True) == ""
        assert ckpt.fingerprint(["a.weight"], stop=lambda: False) == ckpt.fingerprint(["a.weight"]) != ""


def test_files_are_fsynced_beside_the_writes_and_drain_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished file's fsync runs on its own thread while the next file is written; drain waits
    for every fsync and raises the first one's error."""
    import threading
    import time

    from loractl.io.write_queue import WriteQueue

    synced: list[tuple[int, str]] = []
    written_during_sync: list[bool] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        written_during_sync.append((tmp_path / "b").stat().st_size > 0)
        real_fsync(fd)
        synced.append((fd, threading.current_thread().name))

    monkeypatch.setattr(os, "fsync", slow_fsync)
    a = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT)
    b = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)
    with WriteQueue(block_bytes=8, pool=2) as q:
        q.write(a, torch.ones(8, dtype=torch.uint8))
        q.finish(a)
        q.write(b, torch.ones(8, dtype=torch.uint8))  # written while `a` is being fsynced
        q.finish(b)
        q.drain()
        assert [fd for fd, _ in synced] == [a, b] and {n for _, n in synced} == {"loractl-fsync_0"}
        assert written_during_sync[0]

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    c = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    with WriteQueue(block_bytes=8, pool=2) as q:
        q.finish(c)
        with pytest.raises(OSError, match="I/O error"):
            q.drain()
