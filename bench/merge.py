"""Benchmark: `loractl merge` against PEFT's load + merge_and_unload + save_pretrained, and `cp -r`.

    python bench/merge.py                      # ~0.6 GB bf16 random Llama (4 layers, vocab 32000)
    python bench/merge.py --layers 22 --reps 3 # ~1.1 B parameters, TinyLlama's shapes (2.2 GB)
    python bench/merge.py --layers 22 --previous /tmp/old   # also an older loractl (`git archive` export)

Builds a random Llama checkpoint in bf16, sharded, and a rank-16 all-linear PEFT adapter for it,
then times, interleaved and repeated, each contender in its own child process: wall time and the
child's own peak RSS (`os.wait4`). This driver never imports torch, so a child's peak RSS is its
own and not inherited from the launcher (PERF.md). The page cache is warmed first, and the
outputs are compared (loractl vs PEFT) at the end. loractl fsyncs its output before the rename;
PEFT and cp do not. loractl runs with its fingerprint cache warm (a second merge of the same base), and
once more with an empty one ("first"), which hashes the base.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    args = _parser().parse_args()
    if args.step == "build":
        build(Path(args.work), args.layers, args.vocab)
    elif args.step == "library":
        library_merge(Path(args.work), args.out)
    elif args.step == "peft":
        peft_merge(Path(args.work))
    elif args.step == "compare":
        compare(Path(args.work))
    else:
        run(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", default="run", choices=["run", "build", "library", "peft", "compare"])
    p.add_argument("--work", default="/tmp/loractl-bench-merge", help="scratch directory (GBs)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default="out-library", help="the in-process merge's output, under --work")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--previous", help="another loractl source tree, timed side by side (CLI and in-process)")
    p.add_argument("--skip-peft", action="store_true", help="leave PEFT out (its output must exist for compare)")
    return p


# ------------------------------------------------------------------ children (import torch)


def build(work: Path, layers: int, vocab: int) -> None:
    """TinyLlama's shapes (hidden 2048, MLP 5632, 32 heads / 4 KV heads) with `layers` layers, bf16, 500 MB shards."""
    import torch
    from transformers import LlamaConfig

    from loractl.adapter import Adapter, LoraModule
    from loractl.formats import save_adapter
    from loractl.io.checkpoint_writer import write_sharded
    from loractl.io.safetensors_writer import TensorSpec

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    shapes = _llama_shapes(layers, vocab)
    specs = [TensorSpec(n, "BF16", s) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        return (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)

    base = work / "base"
    write_sharded(base, specs, produce, 500_000_000, {"format": "pt"})
    config.save_pretrained(base)
    modules = {
        n[: -len(".weight")]: LoraModule(
            A=torch.randn(16, s[1], generator=gen) * 0.01,
            B=torch.randn(s[0], 16, generator=gen) * 0.01,
            scale=2.0,
            alpha=32.0,
        )
        for n, s in shapes.items()
        if len(s) == 2 and ".layers." in n
    }
    save_adapter(Adapter(modules=modules), work / "adapter")
    print(json.dumps({"parameters": sum(_numel(s) for s in shapes.values()), "modules": len(modules)}))


def _llama_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    h, mlp, kv = 2048, 5632, 256
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (mlp, h),
            p + "mlp.up_proj.weight": (mlp, h),
            p + "mlp.down_proj.weight": (h, mlp),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def library_merge(work: Path, out: str) -> None:
    """loractl's merge() alone, imports excluded: what the streaming costs, printed as `inner=<s>`."""
    import torch  # noqa: F401 - imported before the clock starts

    from loractl.ops.merge import merge

    start = time.perf_counter()
    merge(work / "base", [work / "adapter"], work / out)
    print(f"inner={time.perf_counter() - start:.3f}")


def peft_merge(work: Path) -> None:
    """The peer: what users run today."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
    merged.save_pretrained(work / "out-peft", max_shard_size="500MB")


def compare(work: Path) -> None:
    """Per tensor: bit-identical, or the largest distance in bf16 ulps (int16 steps)."""
    import torch

    from loractl.io.checkpoint import Checkpoint

    ours, peft = Checkpoint(work / "out-loractl"), Checkpoint(work / "out-peft")
    identical, worst = 0, 0
    for name in ours.names:
        a, b = ours.get(name), peft.get(name)
        if torch.equal(a, b):
            identical += 1
            continue
        worst = max(worst, int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max()))
    doc = {"tensors": len(ours.names), "identical_to_peft": identical, "max_ulp": worst}
    for other in ("out-library", "out-old", "out-old-library"):
        if (work / other).is_dir():
            files = (work / "out-loractl").iterdir()
            doc[f"cli_equals_{other}"] = all((work / other / p.name).read_bytes() == p.read_bytes() for p in files)
    print(json.dumps(doc))


# ------------------------------------------------------------------ driver (no torch)


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if not (work / "adapter").is_dir():
        shutil.rmtree(work, ignore_errors=True)
        _child(
            [
                sys.executable,
                "-m",
                "bench.merge",
                "build",
                "--work",
                str(work),
                "--layers",
                str(args.layers),
                "--vocab",
                str(args.vocab),
            ]
        )
    size = sum(p.stat().st_size for p in (work / "base").iterdir())
    subprocess.run(f"cat {work}/base/* > /dev/null", shell=True, check=True)  # warm page cache
    cold, warm = work / "cache-cold", work / "cache-warm"  # loractl's fingerprint cache (LORACTL_CACHE_DIR)
    cli = [sys.executable, "-m", "loractl", "merge", str(work / "base"), str(work / "adapter"), "-o"]
    shutil.rmtree(warm, ignore_errors=True)
    _child(["env", f"LORACTL_CACHE_DIR={warm}", *cli, str(work / "out-warmup")])  # fills the warm cache
    shutil.rmtree(work / "out-warmup")
    contenders = {
        "cp -r (I/O floor)": (["cp", "-r", str(work / "base"), str(work / "out-cp")], "out-cp"),
        "loractl merge, first (base hashed)": (
            ["env", f"LORACTL_CACHE_DIR={cold}", *cli, str(work / "out-first")],
            "out-first",
        ),
        "loractl merge": (
            [
                "env",
                f"LORACTL_CACHE_DIR={warm}",
                sys.executable,
                "-m",
                "loractl",
                "merge",
                str(work / "base"),
                str(work / "adapter"),
                "-o",
                str(work / "out-loractl"),
            ],
            "out-loractl",
        ),
        "loractl merge() in-process": (
            ["env", f"LORACTL_CACHE_DIR={warm}", sys.executable, "-m", "bench.merge", "library", "--work", str(work)],
            "out-library",
        ),
        "PEFT merge_and_unload": ([sys.executable, "-m", "bench.merge", "peft", "--work", str(work)], "out-peft"),
    }
    if args.skip_peft:
        del contenders["PEFT merge_and_unload"]
    roots = {name: ROOT for name in contenders}
    if args.previous:
        old = Path(args.previous).resolve()
        contenders["previous loractl merge"] = (
            [*contenders["loractl merge"][0][:-1], str(work / "out-old")],
            "out-old",
        )
        contenders["previous merge() in-process"] = (
            [sys.executable, str(Path(__file__).resolve()), "library", "--work", str(work), "--out", "out-old-library"],
            "out-old-library",
        )
        roots |= {"previous loractl merge": old, "previous merge() in-process": old}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contenders}
    for _ in range(args.reps):
        for name, (cmd, out) in contenders.items():
            shutil.rmtree(work / out, ignore_errors=True)
            shutil.rmtree(cold, ignore_errors=True)
            results[name].append(_child(cmd, roots[name]))
    _child([sys.executable, "-m", "bench.merge", "compare", "--work", str(work)])
    _table(results, size, args)


def _child(cmd: list[str], root: Path = ROOT) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB, CPU seconds) of one child process with `root`'s loractl; a child
    printing `inner=<s>` times itself. CPU time shows work done on side threads, which wall time hides
    (the base hash runs beside the merge)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    inner = [float(line[6:]) for line in text.splitlines() if line.startswith("inner=")]
    if text.startswith("{"):
        print(text.strip())
    cpu = usage.ru_utime + usage.ru_stime
    return (inner[0] if inner else wall), usage.ru_maxrss / 1e6, cpu  # ru_maxrss is in KiB on Linux


def _table(results: dict[str, list[tuple[float, float, float]]], size: int, args: argparse.Namespace) -> None:
    cp = statistics.median(w for w, _, _ in results["cp -r (I/O floor)"])
    peft = statistics.median(w for w, _, _ in results.get("PEFT merge_and_unload", [(math.nan, 0.0, 0.0)]))
    print(f"\nbase {size / 1e9:.2f} GB bf16, {args.layers} layers, vocab {args.vocab}; median of {args.reps} runs")
    print("| contender | wall s (median) | runs | CPU s (median) | peak RSS GB | × cp | PEFT ÷ it |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, _, c in runs)
        rss = max(r for _, r, _ in runs)
        walls = ", ".join(f"{w:.2f}" for w, _, _ in runs)
        print(f"| {name} | {wall:.2f} | {walls} | {cpu:.2f} | {rss:.2f} | {wall / cp:.1f} | {peft / wall:.1f} |")


if __name__ == "__main__":
    main()
