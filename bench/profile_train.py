"""Where a loractl training step's time goes: one step under torch.profiler, each op's own CPU time in a bucket.

    python bench/profile_train.py --layers 30 --seq 256 --base-dtype bf16 --threads 2
    python bench/profile_train.py --layers 30 --seq 256 --threads 1 --top 30

The model is bench/train.py's random Llama (SmolLM2-135M shape, batch 8, r16 all-linear); one warm-up step
(base_matmul's measurements, oneDNN's kernel compiles), then one profiled step. Each op's self CPU time goes to
one bucket, decided by its name and input shapes: frozen matmuls (no dimension equal to the rank), LoRA
products (one dimension is the rank, the low-rank `addmm` into the base output included), the head and its
loss (a vocabulary-sized dimension), attention (SDPA and its backward), casts and copies, the optimizer
(AdamW, gradient clipping, zeroing) and the rest (norms, SiLU, rotary, residual adds: elementwise). The matmul
buckets also show their GFLOP/s (2·m·k·n per product over the bucket's time). With several threads, self CPU
time is per op wall time on the calling thread: the buckets add up to the step's wall time, not its CPU time. `--cpu-isa` caps oneDNN as bench/train.py's does.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from typing import Any

from flops import ISA_CAPS, cap_isa, onednn_isa
from train import PRESETS, SHAPE, build_model, isa_text, labels, lengths

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
CASTS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")
OPTIMIZER = ("_fused_adam", "_foreach_", "aten::zero_", "aten::fill_", "clip_grad", "aten::linalg_vector_norm")


def bucket(name: str, shapes: list[Any], rank: int, vocab: int) -> str:
    """The part of the step an op belongs to (see the module docstring)."""
    dims = [d for s in shapes if isinstance(s, list) for d in s if isinstance(d, int)]
    if "attention" in name or "scaled_dot_product" in name:
        return "attention"
    if vocab in dims:
        return "head + loss"
    if name in MATMULS:
        return "LoRA products" if rank in dims else "frozen matmuls"
    if name in CASTS:
        return "casts, copies"
    if any(k in name for k in OPTIMIZER):
        return "optimizer"
    return "norms, elementwise, other"


def matmul_flops(name: str, shapes: list[Any]) -> float:
    """2·m·k·n of one mm/addmm/bmm call from its input shapes (0 when they are not known)."""
    mats = [s for s in shapes if isinstance(s, list) and len(s) in (2, 3)]
    if name in ("aten::mm", "aten::bmm") and len(mats) >= 2:
        a, b = mats[0], mats[1]
    elif name in ("aten::addmm", "aten::addmm_", "aten::baddbmm") and len(mats) >= 3:
        a, b = mats[1], mats[2]
    else:
        return 0.0
    return 2.0 * math.prod(a) * b[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in SHAPE:
        parser.add_argument(f"--{name}", type=int, default=PRESETS["smollm2"][name])
    for name, default in (("seq", 256), ("batch", 8), ("rank", 16), ("threads", 0), ("top", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--base-dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    parser.add_argument("--cpu-isa", choices=ISA_CAPS, help="cap oneDNN at this ISA (bench/train.py) [none]")
    parser.add_argument("--label-share", type=float, default=1.0)
    parser.add_argument("--ragged", action="store_true")
    args = parser.parse_args()
    if args.cpu_isa:
        cap_isa(args.cpu_isa)
    args.base, args.quantize, args.device = None, None, "cpu"

    import torch
    from torch.profiler import ProfilerActivity, profile

    from loractl.train import Callback, Example, TrainConfig, inject, train

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rows = [Example(tuple(r[:n]), tuple(t[:n]))
            for r, t, n in zip(ids.tolist(), labels(ids, args).tolist(), lengths(args), strict=True)]  # fmt: skip
    config = TrainConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear", steps=2, batch_size=args.batch,
                         max_len=args.seq, lr=1e-4)  # fmt: skip
    inject(model, config)
    clock: list[tuple[float, float]] = []

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    class Step(Callback):  # the profiler runs from the end of the warm-up step to the end of the next one
        def on_step(self, metrics: dict[str, float]) -> None:
            clock.append((time.perf_counter(), time.process_time()))
            prof.start() if len(clock) == 1 else prof.stop()

    train(model, rows, config, callbacks=[Step()])
    wall, cpu = clock[1][0] - clock[0][0], clock[1][1] - clock[0][1]

    times: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str, str], list[float]] = {}
    for event in prof.events():
        if event.device_type.name != "CPU":
            continue
        shapes = list(event.input_shapes or [])
        part = bucket(event.name, shapes, args.rank, args.vocab)
        times[part] += event.self_cpu_time_total / 1e6
        flops[part] += matmul_flops(event.name, shapes) if event.name in MATMULS else 0.0
        key = (part, event.name, str(shapes)[:70])
        entry = ops.setdefault(key, [0.0, 0.0])
        entry[0] += event.self_cpu_time_total / 1e6
        entry[1] += 1
    total = sum(times.values())
    print(f"threads {torch.get_num_threads()}, base {args.base_dtype}, layers {args.layers}, seq {args.seq}, "
          f"batch {args.batch}: profiled step {wall:.2f} s wall, {cpu:.2f} CPU s (profiler overhead included); "
          f"ops' self time {total:.2f} s")  # fmt: skip
    print(f"oneDNN: {isa_text(onednn_isa())}")
    print("\n| part of the step | s | share | GFLOP/s |\n|---|---:|---:|---:|")
    for part, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
        rate = f"{flops[part] / seconds / 1e9:.0f}" if flops[part] else ""
        print(f"| {part} | {seconds:.3f} | {100 * seconds / total:.0f} % | {rate} |")
    if args.top:
        print("\n| part | op | input shapes | calls | s |\n|---|---|---|---:|---:|")
        for (part, name, shapes), (seconds, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"| {part} | {name} | {shapes} | {calls:.0f} | {seconds:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
