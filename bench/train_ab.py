"""Two versions of loractl's training step in one process, step for step: the firm before/after on a loaded machine.

    git archive COMMIT loractl | tar -x -C /tmp/before     # the code to compare against
    python bench/train_ab.py --before /tmp/before --layers 30 --seq 256 --base-dtype bf16 --threads 1 --rounds 5

The older `loractl/` is imported under another name (`loractl_before`: the package imports itself relatively), each
side injects its own copy of the same random base (bench/random_llama.py, SmolLM2-135M shape, batch 8, r16
all-linear), and the rounds alternate the sides (the order flips each round) so a burst of other jobs' load hits
both alike. Each round runs `train` for two steps per side and keeps the second (the first pays the optimizer's
creation); the figure is each side's CPU seconds of that step (one thread: the step's own work) and wall seconds,
medians over rounds, and their ratio, and how far apart the two sides' losses came out step for step.
`--cpu-isa` caps oneDNN as bench/train.py's does; `--label-share` and `--ragged` give chat-like rows as its
options of those names do:

    python bench/train_ab.py --before /tmp/before --layers 30 --seq 256 --label-share 0.33 --ragged --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path
from typing import Any

from flops import ISA_CAPS, cap_isa, onednn_isa
from train import PRESETS, SHAPE, build_model, isa_text, labels, lengths


def side_runner(package: str, model: Any, rows: list[tuple[list[int], list[int]]], args: argparse.Namespace) -> Any:
    """A function running one two-step `train` of `package` on `model` (injected once), returning the second
    step's (wall, CPU) seconds and both steps' losses."""
    api = import_module(f"{package}.train")
    config = api.TrainConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear", steps=2,
                             batch_size=args.batch, max_len=args.seq, lr=1e-4)  # fmt: skip
    api.inject(model, config)
    data = [api.Example(tuple(r), tuple(t)) for r, t in rows]

    def run() -> tuple[float, float, list[float]]:
        marks: list[tuple[float, float]] = []
        losses: list[float] = []

        class Clock(api.Callback):  # type: ignore[misc,name-defined]
            def on_step(self, metrics: dict[str, float]) -> None:
                marks.append((time.perf_counter(), time.process_time()))
                losses.append(metrics["loss"])

        api.train(model, data, config, callbacks=[Clock()])
        return marks[1][0] - marks[0][0], marks[1][1] - marks[0][1], losses

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a directory holding the older code's loractl/")
    for name in SHAPE:
        parser.add_argument(f"--{name}", type=int, default=PRESETS["smollm2"][name])
    for name, default in (("seq", 256), ("batch", 8), ("rank", 16), ("threads", 1), ("rounds", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--base-dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    parser.add_argument("--cpu-isa", choices=ISA_CAPS, help="cap oneDNN at this ISA (bench/train.py) [none]")
    parser.add_argument("--label-share", type=float, default=1.0, help="share of each row that takes a loss [1]")
    parser.add_argument("--ragged", action="store_true", help="rows of --seq down to seq/4 tokens, padded by collate")
    args = parser.parse_args()
    if args.cpu_isa:
        cap_isa(args.cpu_isa)
    args.base, args.quantize, args.device = None, None, "cpu"

    scratch = Path(tempfile.mkdtemp(prefix="train-ab-"))
    shutil.copytree(Path(args.before) / "loractl", scratch / "loractl_before")
    sys.path.insert(0, str(scratch))
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rows = [(r[:n], t[:n]) for r, t, n in zip(ids.tolist(), labels(ids, args).tolist(), lengths(args), strict=True)]
    sides = {name: side_runner(package, copy.deepcopy(base), rows, args)
             for name, package in (("before", "loractl_before"), ("after", "loractl"))}  # fmt: skip
    del base
    load = os.getloadavg()[0]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name in sides if round_ % 2 == 0 else reversed(sides):
            *timed, step_losses = sides[name]()
            times[name].append((timed[0], timed[1]))
            losses[name] += step_losses
            wall, cpu = times[name][-1]
            print(f"round {round_ + 1} {name}: {wall:.2f} s wall, {cpu:.2f} CPU s", file=sys.stderr, flush=True)
    shutil.rmtree(scratch)
    rows_text = f", {args.label_share:.0%} labelled" + (", ragged" if args.ragged else "")
    print(f"{args.base_dtype} base, {args.layers} layers, seq {args.seq}, batch {args.batch}{rows_text}, "
          f"{args.threads} threads; "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"oneDNN: {isa_text(onednn_isa())}")
    print("\n| side | CPU s/step per round | median | wall s/step median |\n|---|---|---:|---:|")
    med = {}
    for name, runs in times.items():
        med[name] = statistics.median(c for _, c in runs), statistics.median(w for w, _ in runs)
        print(f"| {name} | {', '.join(f'{c:.2f}' for _, c in runs)} | {med[name][0]:.2f} | {med[name][1]:.2f} |")
    ratios = [a[1] / b[1] for a, b in zip(times["after"], times["before"], strict=True)]
    print(
        f"\nafter / before, CPU s: {med['after'][0] / med['before'][0]:.2f}x of the medians "
        f"(round by round {', '.join(f'{r:.2f}' for r in ratios)}); wall: {med['after'][1] / med['before'][1]:.2f}x"
    )
    # each side trains its own copy of the base from the same start, round after round: step k is the same step
    apart = max(abs(a - b) / abs(b) for a, b in zip(losses["after"], losses["before"], strict=True))
    print(f"losses: {len(losses['after'])} steps a side, at most {apart:.1e} apart (relative)")


if __name__ == "__main__":
    main()
