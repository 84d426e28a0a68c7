"""Training throughput and peak memory: loractl's loop vs PEFT + a plain PyTorch loop, on the same base.

Each variant runs in a fresh child process (this launcher never imports torch, so a child's peak
RSS is its own), on the same random Llama and the same token batch, interleaved over --rounds.
The base is built on the meta device and materialised in its target dtype (never in float32,
bench/random_llama.py), and with --quantize its linear layers are replaced layer by layer by
bitsandbytes ones; or --base loads a saved one through loractl's own loader, on both sides.

    python bench/train.py                                   # SmolLM2-135M shapes, seq 96, batch 8, r16
    python bench/train.py --seq 256 --rounds 3
    python bench/train.py --variants loractl+ckpt,peft+ckpt,peft
    python bench/train.py --base-dtype bf16 --variants loractl,peft
    python bench/train.py --quantize nf4 --variants loractl,peft
    python bench/train.py --preset 7b --base-dtype bf16 --save-base /tmp/llama7b-bf16   # 13.5 GB, 0.6 GB RSS
    python bench/train.py --base /tmp/llama7b-bf16 --seq 64 --batch 1 --steps 2 --warmup 0 --variants loractl,peft
    python bench/train.py --variants loractl,loractl+dora,peft,peft+dora   # DoRA's cost over LoRA, each side
    python bench/train.py --threads 1                       # CPU seconds per step hold up on a loaded machine
    python bench/train.py --label-share 0.33                # chat-like rows: a third of the tokens take a loss
    python bench/train.py --label-share 0.33 --ragged       # and rows of seq down to seq/4 tokens, as chat rows are
    python bench/train.py --device cuda --base-dtype bf16   # on a GPU (bench/gpu_train.py: the prepared GPU run)
    python bench/train.py --cpu-isa avx512_core_bf16 --base-dtype bf16   # as on a CPU with avx512_bf16 and no AMX

Each child also measures a 2048² float32 and bf16 matmul with its own threads before it builds the model,
and the launcher prints each variant's model FLOP/s (bench/flops.py: the step's matmul work) next to the
rate of the dtype its frozen matmuls run in, with the CPU flags and the load average.

--cpu-isa caps oneDNN (ONEDNN_MAX_CPU_ISA, set for the children before torch starts; torch's bf16 matmuls and
attention run through oneDNN) at an older CPU's instructions: on a CPU with AMX, `avx512_core_bf16` measures the
machine without AMX that has only avx512_bf16, `avx512_core` one without bf16 units. The launcher asks oneDNN
(ONEDNN_VERBOSE) which ISA and bf16 matmul kernel it then runs, and prints them beside the CPU flags and in each
row: the rates measured show whether the cap held. float32 matmuls (MKL) are not capped.

Each step is timed twice: wall seconds (tokens/s) and the process's CPU seconds. On a shared
machine the wall clock measures the other jobs as much as the step; with --threads 1 the CPU
seconds of a step are its work alone (no OpenMP thread waiting on a descheduled sibling).

With --device cuda the model, the batch and the step are on the GPU (loractl's side through TrainConfig's device,
as `loractl train --device cuda`); each step is timed between `torch.cuda.synchronize()` calls, the matmul rates
are the GPU's (an 8192² matmul: a 2048² one is too small to fill it), and each child reports the GPU's name and
its peak allocated GPU memory (`torch.cuda.max_memory_allocated`) beside its RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from flops import (
    ISA_CAPS,
    ISA_ENV,
    MATMUL_SIZE,
    cap_isa,
    cpu_flags,
    frozen_products,
    matmul_rate,
    onednn_isa,
    products_seconds,
    step_flops,
)

GPU_MATMUL_SIZE = 8192
VARIANTS = ("loractl", "peft", "loractl+ckpt", "peft+ckpt")  # also loractl+dora, peft+dora (DoRA)
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152}
PRESETS = {
    "smollm2": SMOLLM2,
    "7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000},
}
SHAPE = tuple(SMOLLM2)


def child(args: argparse.Namespace) -> None:
    """Run one variant; print one JSON line: median seconds and tokens/s over the measured steps, peak RSS."""
    import resource
    import time

    import torch

    from loractl.train.distributed import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    pick_device(args.device)  # refuses cuda where torch sees none, as `loractl train` does (TrainConfig keeps "cuda")
    cuda = args.device.startswith("cuda")
    size = GPU_MATMUL_SIZE if cuda else MATMUL_SIZE
    rates = {name: matmul_rate(name, size, device=args.device) for name in ("float32", "bfloat16")}  # before the model
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(args)
    load_s = time.perf_counter() - start
    native = _native_dtype(model)  # before either side wraps the layers
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times: list[tuple[float, float]] = []  # (wall, CPU) seconds per step
    run = _loractl if args.variant.startswith("loractl") else _peft
    trainable = run(model, ids, args, args.warmup + args.steps, times)
    step_s = statistics.median(wall for wall, _ in times[args.warmup :])
    cpu_s = statistics.median(cpu for _, cpu in times[args.warmup :])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(p.numel() for p in model.parameters())
    shape, targets = {k: getattr(args, k) for k in SHAPE}, labels(ids, args)
    flops = sum(step_flops(shape, batch=1, seq=n, rank=args.rank, label_share=targets[i, 1:n].ne(-100).sum().item() / n)
                for i, n in enumerate(lengths(args)))  # fmt: skip
    calls = frozen_products(shape, tokens=sum(lengths(args)), labelled=int(targets[:, 1:].ne(-100).sum()))
    dtype = _matmul_dtype(args, native)
    # the floor is a CPU measurement: on a GPU it would spend minutes of the device's time on the CPU
    gemm_s, gemm_cpu_s = (None, None) if cuda else products_seconds(calls, dtype)
    doc = {"variant": args.variant, "step_s": step_s, "tokens_per_s": sum(lengths(args)) / step_s, "cpu_s": cpu_s,
           "peak_rss": rss, "trainable": trainable, "total": total, "load_s": load_s, "steps_s": times,
           "model_flop_s": flops / step_s, "model_flop_cpu_s": flops / cpu_s, "matmul_dtype": dtype,
           "base_matmul": _choices(), "gemm_floor_s": gemm_s,
           "gemm_floor_cpu_s": gemm_cpu_s, "gemm_flops": sum(2 * rows * out * inner for rows, out, inner, _ in calls),
           "matmul_flop_s": {k: wall for k, (wall, _) in rates.items()},
           "matmul_flop_cpu_s": {k: cpu for k, (_, cpu) in rates.items()},
           "cpu_flags": cpu_flags(), "isa_cap": os.environ.get(ISA_ENV), "threads": torch.get_num_threads(), "device": args.device, "matmul_size": size,
           "gpu": torch.cuda.get_device_name(args.device) if cuda else None,
           "peak_gpu": torch.cuda.max_memory_allocated(args.device) if cuda else None}  # fmt: skip
    print(json.dumps(doc))


def _matmul_dtype(args: argparse.Namespace, native: Any) -> str:
    """The dtype the frozen matmuls run in: the base weights' own (PEFT), or for loractl the one `base_matmul`
    measured faster for the most FLOPs of the step's shapes (where it measured none: its choice without a shape,
    which honours LORACTL_BASE_MATMUL)."""
    import torch

    from loractl.train.base_matmul import matmul_dtype

    chosen: dict[str, float] = {}
    for c in _choices() if args.variant.startswith("loractl") else []:
        chosen[c["dtype"]] = chosen.get(c["dtype"], 0.0) + c["shape"][0] * c["shape"][1]
    if not chosen and args.variant.startswith("loractl"):
        native = matmul_dtype(native, torch.device("cpu"))
    return max(chosen, key=lambda k: chosen[k]) if chosen else str(native).removeprefix("torch.")


def _native_dtype(model: Any) -> Any:
    """The dtype the base's first decoder linear computes in: its weights' (a quantized layer's compute dtype)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "Linear" in type(module).__name__ and weight is not None:
            if weight.dtype.is_floating_point:
                return weight.dtype
            return getattr(module, "compute_dtype", None) or model.dtype
    return model.dtype


def _choices() -> list[dict[str, Any]]:
    """`base_matmul`'s measurements in this process: per weight shape, each way's GFLOP/s and the dtype kept."""
    from loractl.train.base_matmul import MEASURED

    return [{"shape": c.shape, "dtype": str(c.dtype).removeprefix("torch."), "float32": c.flops / c.float32_s / 1e9,
             "native": c.flops / c.native_s / 1e9, "native_dtype": str(c.native).removeprefix("torch.")}
            for c in MEASURED.values()]  # fmt: skip


def build_model(args: argparse.Namespace) -> Any:
    """The benchmark's base: loaded from --base through loractl's own loader, or built in memory (random_llama)."""
    if args.base:
        from loractl.train.base import load_base

        return load_base(args.base, dtype=args.base_dtype, quantize=args.quantize, device=args.device)[0]
    from random_llama import DTYPES
    from random_llama import build_model as build_random

    dtype = DTYPES[args.base_dtype or "fp32"]
    return build_random(_config(args, dtype), dtype, args.quantize, args.device)


def _config(args: argparse.Namespace, dtype: Any) -> Any:
    from random_llama import llama_config

    return llama_config({k: getattr(args, k) for k in SHAPE}, dtype, max(args.seq, 2048))


def lengths(args: argparse.Namespace) -> list[int]:
    """Each row's token count: --seq, or with --ragged spread evenly over [seq/4, seq] (rows of chat data differ)."""
    if not args.ragged:
        return [args.seq] * args.batch
    low = args.seq // 4
    return [args.seq - (args.seq - low) * i // max(args.batch - 1, 1) for i in range(args.batch)]


def labels(ids: Any, args: argparse.Namespace) -> Any:
    """Each row's labels: its tokens, the first (1 − --label-share) of each row ignored (-100) as a chat prompt's
    are, and the padding after a --ragged row's end."""
    out = ids.clone()
    for i, n in enumerate(lengths(args)):
        out[i, : round(n * (1 - args.label_share))] = -100
        out[i, n:] = -100
    return out


def _loractl(model: Any, ids: Any, args: argparse.Namespace, steps: int, times: list[tuple[float, float]]) -> int:
    import time

    import torch

    from loractl.train import Callback, Example, TrainConfig, inject, train

    class Clock(Callback):
        cpu, wall = time.process_time(), time.perf_counter()

        def on_step(self, metrics: dict[str, float]) -> None:
            if args.device.startswith("cuda"):  # the loop's clock stops before the GPU has finished the step
                torch.cuda.synchronize()
            now, wall = time.process_time(), time.perf_counter()
            times.append((wall - self.wall if args.device.startswith("cuda") else metrics["step_s"], now - self.cpu))
            self.cpu, self.wall = now, wall
            print(f"step {len(times)}: {times[-1][0]:.1f} s", file=sys.stderr, flush=True)

    config = TrainConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear", steps=steps, batch_size=args.batch,
                         max_len=args.seq, lr=1e-4, grad_checkpointing=args.variant.endswith("ckpt"),
                         compile=args.compile, dora="dora" in args.variant, device=args.device)  # fmt: skip
    injection = inject(model, config)
    rows = [Example(tuple(r[:n]), tuple(label[:n]))
            for r, label, n in zip(ids.tolist(), labels(ids, args).tolist(), lengths(args), strict=True)]  # fmt: skip
    train(model, rows, config, callbacks=[Clock()])
    return injection.trainable


def _peft(model: Any, ids: Any, args: argparse.Namespace, steps: int, times: list[tuple[float, float]]) -> int:
    """The loop a PEFT user writes: forward with labels, backward, AdamW step."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0,
                      use_dora="dora" in args.variant)  # fmt: skip
    model = get_peft_model(model, lora)
    ids, sync = ids.to(args.device), torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    if args.variant.endswith("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    mask = (torch.arange(args.seq)[None, :] < torch.tensor(lengths(args))[:, None]).long().to(args.device)
    for _ in range(steps):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels(ids, args), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
        print(f"step {len(times)}: {times[-1][0]:.1f} s", file=sys.stderr, flush=True)
    return sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2", help="model shape [smollm2]")
    for name in SHAPE:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the preset")
    for name, default in (("seq", 96), ("batch", 8), ("rank", 16), ("steps", 3), ("warmup", 1), ("rounds", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child [torch's default]")
    parser.add_argument("--label-share", type=float, default=1.0, help="share of each row that takes a loss [1]")
    parser.add_argument("--ragged", action="store_true", help="rows of --seq down to seq/4 tokens, padded by collate")
    parser.add_argument("--base-dtype", choices=["bf16", "fp16", "fp32"], help="[fp32; with --base its own]")
    parser.add_argument("--base", help="load this checkpoint (e.g. one --save-base wrote) instead of building")
    parser.add_argument("--save-base", metavar="DIR", help="write the random model as a checkpoint and exit")
    parser.add_argument("--quantize", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--compile", action="store_true", help="loractl variants: --compile")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and step run [cpu]")
    parser.add_argument("--cpu-isa", choices=ISA_CAPS, help="cap oneDNN at this ISA (ONEDNN_MAX_CPU_ISA) [none]")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_isa:  # before torch starts, here and (inherited) in the children
        cap_isa(args.cpu_isa)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.base:  # its own shape: the token ids must fit its vocabulary, and the FLOPs are its own
        config = json.loads((Path(args.base) / "config.json").read_text())
        for name, key in zip(SHAPE, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "vocab_size"), strict=True):  # fmt: skip
            setattr(args, name, config[key])
    if args.save_base:
        _save(args)
        return
    if args.variant:
        child(args)
        return
    results: dict[str, list[dict[str, Any]]] = {}
    load = os.getloadavg()
    isa = onednn_isa() if args.device == "cpu" else None
    passthrough = list(sys.argv[1:])
    if "--variants" in passthrough:  # the children get --variant
        del passthrough[passthrough.index("--variants") : passthrough.index("--variants") + 2]
    passthrough = [a for a in passthrough if not a.startswith("--variants=")]
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            results.setdefault(variant, []).append({**json.loads(out.stdout.strip().splitlines()[-1]), "onednn": isa})
            print(json.dumps(results[variant][-1]), file=sys.stderr)
    _machine(results, load)
    _table(results)


def _save(args: argparse.Namespace) -> None:
    from random_llama import DTYPES, save_model

    dtype = DTYPES[args.base_dtype or "fp32"]
    save_model(_config(args, dtype), dtype, Path(args.save_base))


def _machine(results: dict[str, list[dict[str, Any]]], load: tuple[float, ...]) -> None:
    """The CPU flags, threads and load average the figures came from, and each variant's model FLOP/s next to
    the matmul rate measured in the same child (medians over rounds)."""
    first = next(iter(results.values()))[0]
    flags = ", ".join(f for f, on in first["cpu_flags"].items() if on) or "none of avx2, avx512f, avx512_bf16, amx"
    print(f"CPU: {flags}; {first['threads']} threads; load average {load[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    if first.get("onednn"):
        print(f"oneDNN: {isa_text(first['onednn'])}")
    if first.get("gpu"):
        peak = ", ".join(f"{v} {statistics.median(r['peak_gpu'] for r in rs) / 1e9:.2f}" for v, rs in results.items())
        print(f"GPU: {first['gpu']} ({first['device']}); peak allocated GB: {peak}")
    print(f"\n| variant | model GFLOP/s | matmul dtype | its {first.get('matmul_size', 2048)}² matmul GFLOP/s | share "
          "| share in CPU time "
          "| the step's own frozen GEMMs alone: GFLOP/s, s (CPU s) | share of their rate (in CPU time) "
          "| float32 / bf16 matmul GFLOP/s | oneDNN bf16 kernel |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---|---|---|---|")
    for variant, runs in results.items():
        dtype = runs[0]["matmul_dtype"]

        def med(key: str, sub: str | None = None, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median((r[key][sub] if sub else r[key]) for r in runs) / 1e9

        model, rate = med("model_flop_s"), med("matmul_flop_s", dtype)
        cpu_share = med("model_flop_cpu_s") / med("matmul_flop_cpu_s", dtype)
        gemms = "— | —"  # not measured on a GPU
        if runs[0].get("gemm_floor_s") is not None:
            floor, floor_cpu = 1e9 * med("gemm_floor_s"), 1e9 * med("gemm_floor_cpu_s")
            own, own_cpu = med("gemm_flops") / floor, med("gemm_flops") / floor_cpu
            gemms = (f"{own:.0f}, {floor:.2f} s ({floor_cpu:.2f}) | {100 * model / own:.0f}% "
                     f"({100 * med('model_flop_cpu_s') / own_cpu:.0f}%)")  # fmt: skip
        print(f"| {variant} | {model:.0f} | {dtype} | {rate:.0f} | {100 * model / rate:.0f}% | {100 * cpu_share:.0f}% "
              f"| {gemms} | {med('matmul_flop_s', 'float32'):.0f} / {med('matmul_flop_s', 'bfloat16'):.0f} "
              f"| {_kernel(runs[0].get('onednn'))} |")  # fmt: skip
    print()
    for variant, runs in results.items():
        for c in runs[0].get("base_matmul", []):
            print(f"{variant}: base_matmul measured {c['shape'][0]}x{c['shape'][1]}: float32 (upcast) "
                  f"{c['float32']:.0f} GFLOP/s, {c['native_dtype']} {c['native']:.0f} GFLOP/s -> {c['dtype']}")  # fmt: skip
    print()


def isa_text(isa: dict[str, str | None]) -> str:
    """oneDNN's ISA and bf16 matmul kernel (`flops.onednn_isa`) and the cap they ran under, in one line."""
    cap = f"capped at {ISA_ENV}={isa['cap']}" if isa["cap"] else "no ISA cap"
    if not isa["isa"]:
        return f"not used for a bf16 matmul (torch's own kernel; no bf16 units as oneDNN sees it), {cap}"
    return f"{isa['isa']}; bf16 matmul kernel {isa['bf16_matmul']}; {cap}"


def _kernel(isa: dict[str, str | None] | None) -> str:
    if not isa:
        return "—"
    return f"{isa['bf16_matmul'] or 'torch (no oneDNN)'}{' (cap)' if isa['cap'] else ''}"


def _table(results: dict[str, list[dict[str, float]]]) -> None:
    """Medians over rounds; each variant against its PEFT twin (`peft` for `loractl`, `peft+ckpt` for `…+ckpt`),
    "—" where that twin was not run."""
    keys = ("tokens_per_s", "peak_rss", "step_s", "cpu_s")
    med = {v: {k: statistics.median(r[k] for r in runs) for k in keys} for v, runs in results.items()}
    print("| variant | s/step | tokens/s | vs PEFT twin | CPU s/step | vs PEFT twin (CPU) | peak RSS (GB) "
          "| vs PEFT (no ckpt) | trainable parameters |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, runs in results.items():
        twin, peft = med.get(variant.replace("loractl", "peft")), med.get("peft")
        m = med[variant]
        share = f"{runs[0]['trainable']:,} ({100 * runs[0]['trainable'] / runs[0]['total']:.2f}%)"
        print(f"| {variant} | {m['step_s']:.2f} | {m['tokens_per_s']:.0f} | {_ratio(m, twin, 'tokens_per_s')}"
              f" | {m['cpu_s']:.2f} | {_ratio(twin, m, 'cpu_s')}"
              f" | {m['peak_rss'] / 1e9:.2f} | {_ratio(m, peft, 'peak_rss')} | {share} |")  # fmt: skip
    for variant in (v for v in med if "+dora" in v and v.replace("+dora", "") in med):
        lora = med[variant.replace("+dora", "")]
        print(f"\n{variant}: {med[variant]['step_s'] / lora['step_s']:.2f}x the LoRA step "
              f"({med[variant]['cpu_s'] / lora['cpu_s']:.2f}x in CPU seconds)")  # fmt: skip


def _ratio(top: dict[str, float] | None, bottom: dict[str, float] | None, key: str) -> str:
    """top[key] / bottom[key] as "1.23x", or "—" when either side was not run."""
    return "—" if top is None or bottom is None else f"{top[key] / bottom[key]:.2f}x"


if __name__ == "__main__":
    main()
