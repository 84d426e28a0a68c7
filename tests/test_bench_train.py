"""bench/train.py's --device path and bench/gpu_train.py, the prepared GPU run, proven on the CPU.

No GPU figure comes from here: these run the same code on a tiny shape with --device cpu, so that a session
with a GPU spends its minutes measuring. The GPU script's whole path (preflight, both formats, both sides,
JSON lines, table) is the slow test; the default ones run one child in-process and the refusals.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from loractl.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TINY = ["--hidden", "64", "--intermediate", "160", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
TINY += ["--vocab", "1000", "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--rank", "4"]
pytestmark = pytest.mark.usefixtures("one_thread")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal cannot happen")


def _module(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the benchmarks import their siblings (flops, random_llama)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(variant: str, extra: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict:
    bench = _module("train", monkeypatch)
    monkeypatch.setattr(bench, "MATMUL_SIZE", 128)  # the rate probe, not the subject here
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *extra, "--variant", variant])
    bench.main()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_child_on_the_cpu_device_trains_both_sides_alike(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--device cpu: each side's child times warm-up + steps, trains the same LoRA parameters on the same base,
    and says where it ran; the GPU fields are empty off a GPU."""
    docs = [_child(v, ["--device", "cpu", "--base-dtype", "bf16"], monkeypatch, capsys) for v in ("loractl", "peft")]
    for doc in docs:
        assert doc["device"] == "cpu" and doc["gpu"] is None and doc["peak_gpu"] is None
        assert len(doc["steps_s"]) == 3 and doc["step_s"] > 0 and doc["peak_rss"] > 0
        assert doc["matmul_size"] == 128 and doc["matmul_flop_s"]["bfloat16"] > 0
    assert docs[0]["trainable"] == docs[1]["trainable"] > 0
    assert docs[0]["total"] == docs[1]["total"]


@no_cuda
def test_child_refuses_cuda_where_torch_sees_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same refusal as `loractl train --device cuda` (distributed.pick_device), before anything is built."""
    with pytest.raises(UsageError, match="torch sees no CUDA device"):
        _child("loractl", ["--device", "cuda"], monkeypatch, capsys)


def _gpu_train(tmp_path: Path, *args: str, device: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEVICE": device, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(BENCH / "gpu_train.py"), "--out", str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip


@no_cuda
def test_gpu_script_fails_fast_without_cuda(tmp_path: Path) -> None:
    """On a machine without CUDA the prepared GPU run stops at its preflight: an error line and a hint, exit 2,
    no JSON lines started."""
    done = _gpu_train(tmp_path, "--tiny", device="cuda")
    assert done.returncode == 2, done.stderr
    assert "error: torch" in done.stderr and "sees no CUDA device" in done.stderr and "hint:" in done.stderr
    assert not (tmp_path / "gpu_train.jsonl").exists()


BROKEN_BNB = {
    "missing": ("raise ImportError('no bitsandbytes here')", "error: bitsandbytes is not installed"),
    "no kernel": (
        "__version__ = '0.0'\nclass functional:\n    @staticmethod\n    def quantize_4bit(x, quant_type):\n"
        "        raise RuntimeError('no native library for this device')",
        "error: bitsandbytes 0.0 cannot quantize on cpu: no native library for this device",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BNB))
def test_gpu_script_fails_fast_without_a_working_bitsandbytes(case: str, tmp_path: Path) -> None:
    """nf4 needs bitsandbytes that quantizes on the device: missing, or without its native kernel (a build
    for another CUDA), the preflight says which, with a hint, and exits 2 before any run."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "bitsandbytes.py").write_text(BROKEN_BNB[case][0] + "\n")
    env = {**os.environ, "DEVICE": "cpu", "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}
    done = subprocess.run([sys.executable, str(BENCH / "gpu_train.py"), "--tiny", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert BROKEN_BNB[case][1] in done.stderr and "hint:" in done.stderr
    assert not (tmp_path / "out" / "gpu_train.jsonl").exists()


def test_gpu_table_holds_loractl_against_peft_on_the_same_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's ratios: PEFT's step time over loractl's, loractl's peak GPU memory over PEFT's, per base
    format and as medians over rounds; a failed run is listed, not averaged in."""
    gpu = _module("gpu_train", monkeypatch)
    args = argparse.Namespace(shape=gpu.TINYLLAMA, seq=1024, batch=8, rank=16, steps=10, warmup=3)
    rates = {"float32": 50e12, "bfloat16": 700e12}

    def run(fmt: str, variant: str, step_s: float, peak: float) -> dict:
        return {"format": fmt, "variant": variant, "step_s": step_s, "tokens_per_s": 8192 / step_s, "peak_gpu": peak,
                "model_flop_s": 70e12 / step_s, "gpu": "NVIDIA H100 80GB HBM3", "matmul_size": 8192,
                "matmul_flop_s": rates}  # fmt: skip

    results = [run("nf4", "loractl", 0.5, 6e9), run("nf4", "peft", 1.0, 12e9), run("nf4", "loractl", 0.7, 6e9),
               run("nf4", "peft", 1.2, 12e9), run("nf4", "loractl", 0.6, 6e9), run("nf4", "peft", 1.1, 12e9),
               {"format": "bf16", "variant": "peft", "error": "exit 1"}]  # fmt: skip
    table = gpu._table(results, args)
    assert "NVIDIA H100 80GB HBM3" in table
    assert "| nf4 | loractl | 0.600 | 13653 | 1.83x | 6.00 | 0.50x | 116.7 | 17% |" in table
    assert "| nf4 | peft | 1.100 |" in table and "2.00x" in table and "0.30x" in table
    assert "- bf16 peft: exit 1" in table


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_a_tiny_shape_on_the_cpu(tmp_path: Path) -> None:
    """DEVICE=cpu --tiny: the GPU run's own code (preflight with bitsandbytes' nf4 round trip, bf16 and nf4,
    loractl and PEFT children, JSON lines, the table beside Unsloth's ratios) end to end, one round."""
    done = _gpu_train(tmp_path, "--tiny", "--rounds", "1", device="cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu_train.jsonl").read_text().splitlines()]
    assert [(d["format"], d["variant"]) for d in lines] == [("bf16", "loractl"), ("bf16", "peft"),
                                                            ("nf4", "loractl"), ("nf4", "peft")]  # fmt: skip
    assert all("error" not in d and d["device"] == "cpu" and d["step_s"] > 0 for d in lines)
    assert lines[0]["trainable"] == lines[1]["trainable"] == lines[2]["trainable"] == lines[3]["trainable"]
    table = (tmp_path / "gpu_train.md").read_text()
    assert "| nf4 | loractl |" in table and "unsloth.ai/docs/basics/unsloth-benchmarks" in table
    assert table.strip() in done.stdout


AVX512_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False


@pytest.mark.skipif(not AVX512_BF16, reason="the cap to avx512_core_bf16 needs a CPU with avx512_bf16")
def test_cpu_isa_caps_onednn_in_the_children_and_each_row_says_so(tmp_path: Path) -> None:
    """--cpu-isa avx512_core_bf16: oneDNN itself (ONEDNN_VERBOSE) reports the capped ISA and runs its avx512_core_bf16
    bf16 kernel, the child records the cap, and the launcher prints it beside the CPU flags and in the row."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    run = subprocess.run([sys.executable, str(BENCH / "train.py"), *TINY, "--steps", "1", "--variants", "loractl",
                          "--threads", "1", "--cpu-isa", "avx512_core_bf16", "--base-dtype", "bf16"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    child = json.loads(next(line for line in run.stderr.splitlines() if line.startswith("{")))
    assert child["isa_cap"] == "AVX512_CORE_BF16"
    assert child["onednn"]["bf16_matmul"] == "brg_matmul:avx512_core_bf16"
    assert "bfloat16 support" in child["onednn"]["isa"] and "AMX" not in child["onednn"]["isa"]
    assert "capped at ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in run.stdout
    assert "| brg_matmul:avx512_core_bf16 (cap) |" in run.stdout


def test_onednn_isa_reads_onednn_s_own_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cap the probe names whatever oneDNN runs here (or None where torch's bf16 matmul bypasses it); a cap
    cannot be set once torch is imported (oneDNN may have read the variable already)."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    import flops

    found = flops.onednn_isa()
    assert found["cap"] is None
    assert (found["isa"] is None) == (found["bf16_matmul"] is None)
    with pytest.raises(RuntimeError, match="before torch is imported"):
        flops.cap_isa("avx512_core_bf16")
