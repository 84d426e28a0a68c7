"""Merging into a K-quant GGUF against the same merge into the F32 GGUF of the same model (issue 24's goal).

    PYTHONPATH=. python bench/merge_gguf_kquant.py F32.gguf Q4_K_M.gguf [--layers 30] [--repeats 3]

The two files are SmolLM2-135M-Instruct as llama.cpp's `convert_hf_to_gguf.py` writes it (F32) and as
`llama_model_quantize` quantizes that (Q4_K_M); the tests cache both under `$LORACTL_TEST_CACHE/gguf`
(tests/test_merge_gguf_kquant.py builds them). The adapter is a seeded rank-8 LoRA on every linear
layer (q, k, v, o, gate, up, down) of the first `--layers` layers. Each merge runs in its own child
process, interleaved, so its peak RSS is its own (`os.wait4`); the goal compares seconds per byte
written: the Q4_K_M merge may take 2× the F32 merge's time per byte of its (smaller) output.
`merge_s` is the `merge()` call after the imports (torch, gguf-py, llama.cpp's library), which both
merges pay alike; `wall_s` is the whole child process, imports included. The ratio is given for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time, json
from pathlib import Path
from loractl.ops.merge import merge
import torch, gguf, loractl.bases.gguf, loractl.ops.merge_placed, loractl.formats.peft  # imports: in wall_s, not merge_s
from loractl.bases import ggml_quant
ggml_quant.library()
start = time.perf_counter()
report = merge(sys.argv[1], [sys.argv[2]], sys.argv[3], force=True)
merge_s = time.perf_counter() - start
print(json.dumps({"merge_s": merge_s, "by_type": report.rounding_by_type}))
"""


def adapter(model: Path, layers: int, out: Path) -> None:
    import torch

    from loractl.adapter import Adapter, AdapterMeta, LoraModule
    from loractl.bases.gguf import GgufBase
    from loractl.formats import save_adapter

    base = GgufBase(model)
    g = torch.Generator().manual_seed(0)
    mods = {}
    leaves = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}  # fmt: skip
    for layer in range(layers):
        for leaf, stem in leaves.items():
            rows, cols = base.shape(f"blk.{layer}.{stem}.weight")
            a, b = torch.randn(8, cols, generator=g) / cols**0.5, torch.randn(rows, 8, generator=g) * 0.02
            mods[f"model.layers.{layer}.{leaf}"] = LoraModule(A=a, B=b, scale=2.0, alpha=16.0)
    save_adapter(Adapter(modules=mods, meta=AdapterMeta()), out, format="peft", force=True)


def run_child(model: Path, lora: Path, out: Path) -> dict[str, object]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(lora), str(out)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, text
    doc = json.loads(text)
    return {**doc, "wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
            "bytes_written": out.stat().st_size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("f32", type=Path)
    parser.add_argument("quantized", type=Path)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, object]]] = {"f32": [], "quantized": []}
    with tempfile.TemporaryDirectory(prefix="merge-gguf-kquant-") as tmp:
        lora = Path(tmp) / "lora"
        adapter(args.f32, args.layers, lora)
        for _ in range(args.repeats):
            for name in runs:
                runs[name].append(run_child(getattr(args, name), lora, Path(tmp) / f"{name}.gguf"))
    rows = {}
    for name, rs in runs.items():
        merge_s = statistics.median(float(r["merge_s"]) for r in rs)  # type: ignore[arg-type]
        written = int(rs[0]["bytes_written"])  # type: ignore[call-overload]
        rows[name] = {"merge_s": merge_s, "runs": [round(float(r["merge_s"]), 2) for r in rs],  # type: ignore[arg-type]
                      "bytes_written": written, "s_per_gb_written": merge_s / written * 1e9,
                      "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in rs),  # type: ignore[arg-type]
                      "by_type": rs[-1]["by_type"]}  # fmt: skip
    for name, rs in runs.items():
        rows[name]["wall_s"] = statistics.median(float(r["wall_s"]) for r in rs)  # type: ignore[arg-type]
    ratio = rows["quantized"]["s_per_gb_written"] / rows["f32"]["s_per_gb_written"]  # type: ignore[operator]
    size = rows["f32"]["bytes_written"] / rows["quantized"]["bytes_written"]  # type: ignore[operator]
    wall_ratio = rows["quantized"]["wall_s"] / rows["f32"]["wall_s"] * size  # type: ignore[operator]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(json.dumps({"rows": rows, "time_ratio": rows["quantized"]["merge_s"] / rows["f32"]["merge_s"],  # type: ignore[operator]
                      "per_byte_ratio": ratio, "per_byte_ratio_whole_process": wall_ratio, "load": load,
                      "cpu_flags": _flags()}, indent=2))  # fmt: skip


def _flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text})


if __name__ == "__main__":
    main()
