"""The prepared GPU run (issue 26): loractl vs PEFT on a 1.1 B Llama, bf16 and nf4, held against Unsloth's ratios.

One call of at most --budget-s seconds (9 minutes) runs bench/train.py's children on TinyLlama 1.1B's shape
(hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000; random weights), r16 all-linear,
seq 1024, batch 8, with a bf16 base and with an nf4 one (bitsandbytes, computing in bf16), loractl and PEFT +
a plain loop interleaved; a second round where the time allows. Each child's JSON line (bench/train.py: s/step,
tokens/s, peak allocated GPU memory, the GPU's name, its matmul rates) goes to $OUT/gpu_train.jsonl as soon as
it ends; a run that fails or outlasts the budget is a line with its error. The markdown table (also
$OUT/gpu_train.md) puts each loractl/PEFT ratio beside the ratios Unsloth publishes against Hugging Face + FA2.

    python3 bench/gpu_train.py --fetch-wheels     # here, once: bitsandbytes' wheel into .whl/ (the GPU image lacks it)
    python3 bench/gpu_train.py                    # on the GPU machine: the device tool's `run`, carry [".whl"]
    DEVICE=cpu python3 bench/gpu_train.py --tiny  # the same code on a tiny shape on the CPU (tests/test_bench_train.py)
    python3 bench/gpu_train.py --variants loractl,peft,loractl+ckpt,peft+ckpt   # and with checkpointing, each side

Without CUDA, or with nf4 among --formats and no bitsandbytes that quantizes on the GPU, it stops in seconds
with an `error:` line, before any model is built.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WHEELS, SITE = ROOT / ".whl", Path("/tmp/gpu_train-site")
BNB_WHEEL = "bitsandbytes==0.50.2"  # the version this project's venv tests with; ships CUDA 11.8–13.2 kernels
TINYLLAMA = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000}
TINY = {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1000}
# Unsloth's published speed and memory ratios against Hugging Face (+ Flash Attention 2), Alpaca data:
UNSLOTH = [
    (
        "Llama 3.1 8B QLoRA r32, 80 GB GPU",
        2.0,
        0.30,
        "https://unsloth.ai/docs/basics/unsloth-benchmarks (>70% less VRAM)",
    ),
    ("TinyLlama 1.1B, A100 40GB", 2.74, 1 - 0.578, "https://huggingface.co/blog/unsloth-trl (vs HF without FA2)"),
]
PREFLIGHT = """
import sys, torch
device, nf4 = sys.argv[1], sys.argv[2] == "1"
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device\\nhint: run this on the GPU machine, or DEVICE=cpu")
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
if nf4:
    try:
        import bitsandbytes as bnb
    except ImportError:
        sys.exit("error: bitsandbytes is not installed\\nhint: python3 bench/gpu_train.py --fetch-wheels here, "
                 "then carry .whl (or --formats bf16)")
    try:
        x = torch.randn(128, 128, dtype=torch.bfloat16, device=device)
        q, state = bnb.functional.quantize_4bit(x, quant_type="nf4")
        err = ((bnb.functional.dequantize_4bit(q, state) - x).abs().mean() / x.abs().mean()).item()
    except Exception as e:
        sys.exit(f"error: bitsandbytes {bnb.__version__} cannot quantize on {device}: {e}\\n"
                 "hint: its CUDA build must match torch's CUDA (torch.version.cuda); or --formats bf16")
    if not err < 0.25:  # nf4 keeps about 10% of a normal tensor's mean magnitude as error
        sys.exit(f"error: bitsandbytes' nf4 round trip on {device} is off by {err:.0%}\\nhint: --formats bf16")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {name}")
"""


def main() -> int:
    started = time.monotonic()  # the budget counts the preflight and the wheel's install too
    args = _parse()
    if args.fetch_wheels:
        return _fetch_wheels()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(args)
    check = subprocess.run([sys.executable, "-c", PREFLIGHT, args.device, "1" if "nf4" in args.formats else "0"],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    if check.returncode != 0:
        print(check.stderr.strip() or f"error: the preflight check exited {check.returncode}", file=sys.stderr)
        return 2
    print(check.stdout.strip(), flush=True)
    results = _run_all(args, env, out / "gpu_train.jsonl", started)
    table = _table(results, args)
    print(table)
    (out / "gpu_train.md").write_text(table + "\n")
    return 0 if any("error" not in r for r in results) else 1


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=os.environ.get("DEVICE", "cuda"))
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny shape, seq 32, batch 2, 2 steps: the path, no figure"
    )
    parser.add_argument("--formats", default="bf16,nf4", help="base formats, in order [bf16,nf4]")
    parser.add_argument("--variants", default="loractl,peft", help="bench/train.py variants [loractl,peft]")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting runs after this [540]")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, while the budget allows [2]")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_train", help="[$OUT or /tmp/gpu_train]")
    parser.add_argument("--fetch-wheels", action="store_true", help=f"download {BNB_WHEEL}'s wheel into .whl/")
    for name, default in (("seq", 1024), ("batch", 8), ("rank", 16), ("steps", 10), ("warmup", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    args.formats = [f for f in args.formats.split(",") if f]
    if unknown := set(args.formats) - {"bf16", "nf4"}:
        parser.error(f"--formats: {', '.join(sorted(unknown))} is not bf16 or nf4")
    args.shape = TINY if args.tiny else TINYLLAMA
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = 32, 2, 2, 1
    return args


def _fetch_wheels() -> int:
    """bitsandbytes' manylinux wheel (its CUDA kernels inside) for the GPU machine's Python 3.12, which has no
    registry to install from; the device tool carries .whl (git ignores it)."""
    platforms = [a for p in ("manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]  # fmt: skip
    return subprocess.call([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
                            BNB_WHEEL])  # fmt: skip


def _environment(args: argparse.Namespace) -> dict[str, str]:
    """The children's environment: this checkout's loractl first, and on a GPU bitsandbytes from .whl where
    the Python there lacks it (installed into SITE; the GPU machine's next call starts without it)."""
    paths = [str(ROOT)]
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    if (
        "nf4" in args.formats
        and args.device == "cuda"
        and wheels
        and subprocess.call([sys.executable, "-c", "import bitsandbytes"], stderr=subprocess.DEVNULL)
    ):
        print(f"installing {', '.join(w.name for w in wheels)} into {SITE}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)  # fmt: skip
        paths.append(str(SITE))
    existing = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([existing] if existing else [])]),
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


def _run_all(args: argparse.Namespace, env: dict[str, str], jsonl: Path, start: float) -> list[dict[str, Any]]:
    """Every (round, format, variant) run in turn, each a child under what is left of the budget; a run is
    started only where the longest run so far still fits the time left for it."""
    longest, results = 0.0, []
    jsonl.write_text("")
    runs = [(r, f, v) for r in range(args.rounds) for f in args.formats for v in args.variants.split(",")]
    for round_, fmt, variant in runs:
        left = args.budget_s - (time.monotonic() - start)
        if left < 1.2 * longest or left <= 0:
            print(f"budget: {left:.0f} s left, a run took up to {longest:.0f} s: stopping", flush=True)
            break
        began = time.monotonic()
        doc = _run_one(args, env, fmt, variant, timeout=left)
        longest = max(longest, time.monotonic() - began)
        doc.update(round=round_, format=fmt, shape=args.shape, seq=args.seq, batch=args.batch, rank=args.rank,
                   wall_s=time.monotonic() - began, load_average=os.getloadavg())  # fmt: skip
        results.append(doc)
        with jsonl.open("a") as f:
            f.write(json.dumps(doc) + "\n")
        print(f"{fmt} {variant} (round {round_ + 1}): "
              + (f"error: {doc['error']}" if "error" in doc else f"{doc['step_s']:.3f} s/step"), flush=True)  # fmt: skip
    return results


def _run_one(args: argparse.Namespace, env: dict[str, str], fmt: str, variant: str, timeout: float) -> dict[str, Any]:
    shape = [a for k, v in args.shape.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    command = [sys.executable, str(ROOT / "bench" / "train.py"), *shape, "--base-dtype", "bf16",
               *(["--quantize", "nf4"] if fmt == "nf4" else []), "--device", args.device, "--seq", str(args.seq),
               "--batch", str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--variant", variant]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"outlasted the budget ({timeout:.0f} s left)"}
    if done.returncode != 0:
        return {"variant": variant, "error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Medians over rounds per (format, variant); loractl against PEFT on the same base, then Unsloth's ratios."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "no run finished: see the errors in gpu_train.jsonl"
    first, memory = ok[0], "peak_gpu" if ok[0]["gpu"] else "peak_rss"
    lines = [f"{first['gpu'] or 'CPU (no GPU figure)'}; shape {args.shape}; seq {args.seq}, batch {args.batch}, "
             f"r{args.rank} all-linear; {args.steps} steps after {args.warmup} warm-up, medians over rounds; "
             f"{first['matmul_size']}² matmul: float32 {first['matmul_flop_s']['float32'] / 1e12:.1f}, "
             f"bf16 {first['matmul_flop_s']['bfloat16'] / 1e12:.1f} TFLOP/s",
             "", f"| base | variant | s/step | tokens/s | speed vs PEFT | peak {'GPU allocated' if first['gpu'] else 'RSS'}"
             " GB | memory vs PEFT | model TFLOP/s | share of bf16 matmul |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    med: dict[tuple[str, str], dict[str, float]] = {}
    for key in dict.fromkeys((r["format"], r["variant"]) for r in ok):
        runs = [r for r in ok if (r["format"], r["variant"]) == key]
        med[key] = {
            k: statistics.median(r[k] for r in runs) for k in ("step_s", "tokens_per_s", memory, "model_flop_s")
        }
    for (fmt, variant), m in med.items():
        peft = med.get((fmt, variant.replace("loractl", "peft")))
        speed = f"{peft['step_s'] / m['step_s']:.2f}x" if peft else "—"
        mem = f"{m[memory] / peft[memory]:.2f}x" if peft else "—"
        share = m["model_flop_s"] / first["matmul_flop_s"]["bfloat16"]
        lines.append(f"| {fmt} | {variant} | {m['step_s']:.3f} | {m['tokens_per_s']:.0f} | {speed} "
                     f"| {m[memory] / 1e9:.2f} | {mem} | {m['model_flop_s'] / 1e12:.1f} | {100 * share:.0f}% |")  # fmt: skip
    for name, speed, memory_ratio, _ in UNSLOTH:
        lines.append(f"| Unsloth, published: {name} | Unsloth vs HF | — | — | {speed:.2f}x | — "
                     f"| {memory_ratio:.2f}x | — | — |")  # fmt: skip
    lines += ["", "Unsloth's ratios are its own published figures on other machines (not run here):"]
    lines += [f"- {name}: {source}" for name, _, _, source in UNSLOTH]
    failed = [f"- {r['format']} {r['variant']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(lines + (["", "Failed runs:", *failed] if failed else []))


if __name__ == "__main__":
    sys.exit(main())
