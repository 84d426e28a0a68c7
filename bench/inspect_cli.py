"""Whole-process time of `loractl --help` and `loractl inspect` against loading the tensors and PEFT's path.

Usage: python bench/inspect_cli.py [--size-mb 480] [--repeat 5]
Builds a PEFT-format adapter of about --size-mb (rank 64 on Llama-7B shapes, trimmed to size) in a
temporary directory, then times each variant as a fresh process, interleaved, and prints medians and
ratios as a Markdown table. This script itself never imports torch (so its children start clean).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = """
import sys, torch, loractl
from loractl.adapter import Adapter, AdapterMeta, LoraModule
shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
budget, rank, modules, size = int(sys.argv[2]) * 10**6, 64, {}, 0
g = torch.Generator().manual_seed(0)
for layer in range(80):
    for name, (out, inp) in shapes.items():
        if size >= budget:
            break
        key = f"model.layers.{layer}.{'mlp' if 'proj' in name and name[0] in 'gud' else 'self_attn'}.{name}"
        modules[key] = LoraModule(A=torch.randn(rank, inp, generator=g), B=torch.randn(out, rank, generator=g), scale=2.0, alpha=128.0)
        size += 4 * rank * (inp + out)
loractl.save_adapter(Adapter(modules, meta=AdapterMeta(base_model="meta-llama/Llama-2-7b-hf")), sys.argv[1])
"""

LOAD_ALL = """
import sys, torch
from safetensors.torch import load_file
t = load_file(sys.argv[1] + "/adapter_model.safetensors")
print(sum(float(v.sum()) for v in t.values()) != 0)  # materialize: load_file is lazy (mmap)
"""

PEFT_PATH = """
import sys
from peft import PeftConfig
from peft.utils import load_peft_weights
cfg = PeftConfig.from_pretrained(sys.argv[1])
w = load_peft_weights(sys.argv[1])
print(cfg.r, len(w), sum(float(v.sum()) for v in w.values()) != 0)
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=480)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(Path(tmp) / "adapter")
        subprocess.run([py, "-c", MAKE, adapter, str(args.size_mb)], check=True)
        size = sum(p.stat().st_size for p in Path(adapter).iterdir()) / 1e6
        variants = {
            "`python -c pass` (interpreter start)": [py, "-c", "pass"],
            "`loractl --help`": [py, "-m", "loractl", "--help"],
            "`loractl inspect ADAPTER --json`": [py, "-m", "loractl", "inspect", adapter, "--json"],
            "`loractl inspect ADAPTER --stats --json`": [py, "-m", "loractl", "inspect", adapter, "--stats", "--json"],
            "load all tensors (safetensors `load_file`, materialized)": [py, "-c", LOAD_ALL, adapter],
            "PEFT's path (`PeftConfig` + `load_peft_weights`)": [py, "-c", PEFT_PATH, adapter],
        }
        for cmd in variants.values():  # warm the page cache and the import caches
            timed(cmd)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeat):
            for name, cmd in variants.items():
                times[name].append(timed(cmd))
    inspect = statistics.median(times["`loractl inspect ADAPTER --json`"])
    print(f"adapter: {size:.0f} MB, {args.repeat} interleaved runs, warm page cache\n")
    print("| whole process | median s | × loractl inspect |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / inspect:.1f}× |")


if __name__ == "__main__":
    main()
