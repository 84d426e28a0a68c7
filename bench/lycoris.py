"""Benchmark: LyCORIS LoHa / LoKr files read as their exact LoRA, against plain LoRA files, in one run.

    python bench/lycoris.py                  # 4 SD-UNet-shaped blocks at width 640 (~230 MB base)
    python bench/lycoris.py --blocks 2 --repeats 3

Per block: attention q/k/v/out (640×640), feed-forward (5120×640, 640×2560), two 3×3 convs (640→640),
the shapes of an SD 1.x UNet block. Three adapters over the same modules, written as kohya files:
LoHa dim 8 (exact LoRA rank 64), LoKr factor 8 (full 8×8 w1 ⊗ rank-8 w2: exact rank 64), and plain
LoRA at rank 64 (the same product rank) and rank 8 (the same stored dim). Timed: `load_adapter`
(reading builds the exact factors), `convert --to peft --rank 16` (read, truncate, write, verify), and
`merge` into the base. The figures to compare are ratios within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from timing import timed  # bench/timing.py

from loractl.formats import load_adapter
from loractl.formats.options import ReadOptions
from loractl.io.safetensors_writer import save_tensors
from loractl.ops.convert import convert
from loractl.ops.lowrank import RankRule
from loractl.ops.merge import merge

WIDTH = 640
SHAPES = {
    "attn1.to_q": (WIDTH, WIDTH), "attn1.to_k": (WIDTH, WIDTH), "attn1.to_v": (WIDTH, WIDTH),
    "attn1.to_out.0": (WIDTH, WIDTH), "ff.net.0.proj": (8 * WIDTH, WIDTH), "ff.net.2": (WIDTH, 4 * WIDTH),
    "conv1": (WIDTH, WIDTH, 3, 3), "conv2": (WIDTH, WIDTH, 3, 3),
}  # fmt: skip


def modules(blocks: int) -> dict[str, tuple[int, ...]]:
    """Module path (kohya-resolvable through --base) → base weight shape."""
    return {f"unet.down_blocks.{b}.{name}": shape for b in range(blocks) for name, shape in SHAPES.items()}


def write_base(path: Path, mods: dict[str, tuple[int, ...]]) -> None:
    g = torch.Generator().manual_seed(0)
    save_tensors(path, {f"{m}.weight": torch.randn(*s, generator=g) * 0.02 for m, s in mods.items()}, {})


def write_adapter(path: Path, mods: dict[str, tuple[int, ...]], kind: str, dim: int) -> None:
    """A kohya-style file: `loha`, `lokr` (factor 8: w1 full 8×8, w2 low-rank) or plain `lora`."""
    g = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {}
    for m, shape in mods.items():
        name = "lora_unet_" + m.removeprefix("unet.").replace(".", "_")
        out, flat = shape[0], int(torch.tensor(shape[1:]).prod())

        def r(*s: int) -> torch.Tensor:
            return torch.randn(*s, generator=g) * 0.1

        if kind == "loha":
            t |= {f"{name}.hada_w1_a": r(out, dim), f"{name}.hada_w1_b": r(dim, flat),
                  f"{name}.hada_w2_a": r(out, dim), f"{name}.hada_w2_b": r(dim, flat)}  # fmt: skip
        elif kind == "lokr":
            t |= {
                f"{name}.lokr_w1": r(8, 8),
                f"{name}.lokr_w2_a": r(out // 8, dim),
                f"{name}.lokr_w2_b": r(dim, flat // 8),
            }
        else:
            down = r(dim, *shape[1:]) if len(shape) > 2 else r(dim, flat)
            t |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": r(out, dim, *[1] * (len(shape) - 2))}
        t[f"{name}.alpha"] = torch.tensor(float(dim))
    save_tensors(path, t, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    mods = modules(args.blocks)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {len(mods)} modules")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = d / "base.safetensors"
        write_base(base, mods)
        files = {
            "LoHa dim 8 (exact rank 64)": ("loha", 8),
            "LoKr 8x8 full ⊗ r8 (exact rank 64)": ("lokr", 8),
            "LoRA rank 64": ("lora", 64),
            "LoRA rank 8": ("lora", 8),
        }
        print("| adapter | read s | convert --rank 16 s | merge s |")
        print("| --- | --- | --- | --- |")
        for label, (kind, dim) in files.items():
            path = d / f"{kind}{dim}.safetensors"
            write_adapter(path, mods, kind, dim)
            opts = ReadOptions(base=base)
            read_s, _ = timed(lambda p=path, o=opts: load_adapter(p, options=o), args.repeats)
            conv_s, _ = timed(
                lambda p=path, o=opts: convert(
                    p, d / "out", to="peft", read_options=o, rank=RankRule(rank=16), allow_loss=True, force=True
                ),
                args.repeats,
            )
            merge_s, _ = timed(lambda p=path: merge(base, [p], d / "merged", force=True), args.repeats)
            print(f"| {label} | {read_s:.2f} | {conv_s:.2f} | {merge_s:.2f} |")


if __name__ == "__main__":
    main()
