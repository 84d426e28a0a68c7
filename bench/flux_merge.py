"""Benchmark: `loractl merge` of a LoRA into a Flux.1-dev-shaped transformer (original single file, bf16) against `cp`.

    python bench/flux_merge.py                   # Flux.1-dev: 19 double + 38 single blocks, 11.9 B, 23.8 GB
    python bench/flux_merge.py --blocks 0.5      # half the blocks (same tensor shapes), for a smaller disk

Builds `flux1-dev.safetensors`-style names (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`
of 21504 × 3072, …) with random bf16 values, tensor by tensor with loractl's streaming safetensors writer (no
float32 copy of anything), and a rank-16 kohya LoRA on every linear layer of the blocks (fused qkv and linear1,
as sd-scripts trains it). Then times, each in its own child process with its own peak RSS (`os.wait4`; this
driver never imports torch): `cp` of the base (the I/O floor), and `loractl merge` (the CLI, imports included).
Each output is deleted before the next step: the base and one copy must fit on the disk (df -h first).
`--keep` keeps the base for another run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38  # Flux.1-dev
IN_CHANNELS, CONTEXT, POOLED, TIME = 64, 4096, 768, 256


def shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """Flux.1-dev's transformer in BFL's names (biases and norm scales included)."""
    w = WIDTH
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, rows: int, cols: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (rows, cols), (rows,)

    linear("img_in", w, IN_CHANNELS)
    linear("txt_in", w, CONTEXT)
    for emb, cols in (("time_in", TIME), ("vector_in", POOLED), ("guidance_in", TIME)):
        linear(f"{emb}.in_layer", w, cols)
        linear(f"{emb}.out_layer", w, w)
    for i in range(double):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            linear(f"{b}_mod.lin", 6 * w, w)
            linear(f"{b}_attn.qkv", 3 * w, w)
            linear(f"{b}_attn.proj", w, w)
            linear(f"{b}_mlp.0", MLP, w)
            linear(f"{b}_mlp.2", w, MLP)
            out[f"{b}_attn.norm.query_norm.scale"] = out[f"{b}_attn.norm.key_norm.scale"] = (128,)
    for i in range(single):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * w + MLP, w)
        linear(f"{b}.linear2", w, w + MLP)
        linear(f"{b}.modulation.lin", 3 * w, w)
        out[f"{b}.norm.query_norm.scale"] = out[f"{b}.norm.key_norm.scale"] = (128,)
    linear("final_layer.linear", IN_CHANNELS, w)
    linear("final_layer.adaLN_modulation.1", 2 * w, w)
    return out


def build(work: Path, double: int, single: int, rank: int) -> None:
    """The base (bf16, one tensor at a time) and the kohya LoRA on every block linear (child process)."""
    import torch

    from loractl.adapter import Adapter, LoraModule
    from loractl.formats import save_adapter
    from loractl.io.safetensors_writer import StreamWriter, TensorSpec

    specs = shapes(double, single)
    writer = StreamWriter(work / "flux1-dev.safetensors", [TensorSpec(n, "BF16", s) for n, s in specs.items()])
    g = torch.Generator().manual_seed(0)
    for spec in writer.order:
        writer.write(spec.name, torch.randn(spec.shape, generator=g, dtype=torch.bfloat16).mul_(0.02))
    writer.close()
    modules = {}
    for name, shape in specs.items():
        if name.endswith(".weight") and "_blocks." in name:
            a = torch.randn(rank, shape[1], generator=g, dtype=torch.bfloat16).mul_(0.01)
            b = torch.randn(shape[0], rank, generator=g, dtype=torch.bfloat16).mul_(0.01)
            modules[f"transformer.{name.removesuffix('.weight')}"] = LoraModule(A=a, B=b, scale=1.0, alpha=float(rank))
    save_adapter(Adapter(modules=modules), work / "lora.safetensors", format="kohya")


def _child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{text[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def _machine() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"}
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {' '.join(sorted(flags))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", default="run", choices=["run", "build"])
    p.add_argument("--work", default="/tmp/ditmerge-bench-flux", help="scratch directory (tens of GB)")
    p.add_argument("--blocks", type=float, default=1.0, help="the share of Flux.1-dev's 19 + 38 blocks built")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep the base and the LoRA for another run")
    args = p.parse_args()
    work = Path(args.work)
    double, single = max(1, round(DOUBLE * args.blocks)), max(1, round(SINGLE * args.blocks))
    if args.step == "build":
        build(work, double, single, args.rank)
        return
    work.mkdir(parents=True, exist_ok=True)
    base, lora = work / "flux1-dev.safetensors", work / "lora.safetensors"
    built = 0.0
    if not base.is_file():
        built, _ = _child([sys.executable, "-m", "bench.flux_merge", "build", "--work", str(work),
                           "--blocks", str(args.blocks), "--rank", str(args.rank)])  # fmt: skip
    size = base.stat().st_size
    print(f"base {size / 1e9:.2f} GB bf16 ({double} double + {single} single blocks), built in {built:.0f} s")
    _child(
        ["dd", f"if={base}", "of=/dev/null", "bs=16M"]
    )  # the page cache as warm as it can be for both contenders (it may not hold it all)
    results = {}
    for name, cmd, out in (
        ("cp", ["cp", str(base), str(work / "copy.safetensors")], work / "copy.safetensors"),
        ("loractl merge", [sys.executable, "-m", "loractl", "merge", str(base), str(lora), "-o",
                           str(work / "merged.safetensors")], work / "merged.safetensors"),
    ):  # fmt: skip
        results[name] = _child(cmd)
        out.unlink()
    load = os.getloadavg()
    print(json.dumps({"base_bytes": size, "double": double, "single": single, "rank": args.rank, "load": load,
                      "machine": _machine(), "results": results}))  # fmt: skip
    cp = results["cp"][0]
    print("| contender | wall s | × cp | peak RSS MiB |\n|---|---|---|---|")
    for name, (wall, rss) in results.items():
        print(f"| {name} | {wall:.1f} | {wall / cp:.2f} | {rss:.0f} |")
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
