"""Training throughput and peak memory: loractl's loop vs PEFT + a plain PyTorch loop vs full fine-tuning.

Each variant runs in a fresh child process (this launcher never imports torch, so a child's peak
RSS is its own), on the same random Llama and the same token batch, interleaved over --rounds.

    python bench/train.py                      # hidden 512, 6 layers, vocab 16k, seq 256, batch 8, r=16
    python bench/train.py --steps 3 --hidden 128 --layers 2 --vocab 2000 --seq 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

VARIANTS = ("loractl", "peft", "full", "loractl+ckpt", "peft+ckpt")


def child(args: argparse.Namespace) -> None:
    """Run one variant; print one JSON line: median tokens/s over the measured steps, peak RSS, parameters."""
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq)  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    steps = args.warmup + args.steps
    times: list[float] = []
    if args.variant.startswith("loractl"):
        trainable = _loractl(model, ids, args, steps, times)
    else:
        trainable = _plain(model, ids, args, steps, times)
    tokens = args.batch * args.seq
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({"variant": args.variant, "tokens_per_s": tokens / statistics.median(times[args.warmup :]),
                      "peak_rss": rss, "trainable": trainable, "total": total}))  # fmt: skip
    del time


def _loractl(model: object, ids: object, args: argparse.Namespace, steps: int, times: list[float]) -> int:
    from loractl.train import Callback, Example, TrainConfig, inject, train

    class Clock(Callback):
        def on_step(self, metrics: dict[str, float]) -> None:
            times.append(args.batch * args.seq / metrics["tokens_per_s"])

    config = TrainConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear", steps=steps, batch_size=args.batch,
                         max_len=args.seq, lr=1e-4, grad_checkpointing=args.variant.endswith("ckpt"))  # fmt: skip
    injection = inject(model, config)  # type: ignore[arg-type]
    rows = [Example(tuple(r), tuple(r)) for r in ids.tolist()]  # type: ignore[attr-defined]
    train(model, rows, config, callbacks=[Clock()])  # type: ignore[arg-type]
    return injection.trainable


def _plain(model: object, ids: object, args: argparse.Namespace, steps: int, times: list[float]) -> int:
    """The loop a PEFT user writes: forward with labels, backward, AdamW step."""
    import time

    import torch

    if args.variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(model, lora)  # type: ignore[arg-type]
        if args.variant.endswith("ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()  # type: ignore[attr-defined]
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # type: ignore[operator]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 512), ("intermediate", 1376), ("layers", 6), ("heads", 8), ("vocab", 16000),
                          ("seq", 256), ("batch", 8), ("rank", 16), ("steps", 4), ("warmup", 1), ("rounds", 1)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    results: dict[str, list[dict[str, float]]] = {}
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            results.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    _table(results)


def _table(results: dict[str, list[dict[str, float]]]) -> None:
    peft = statistics.median(r["tokens_per_s"] for r in results.get("peft", [{"tokens_per_s": float("nan")}]))
    peft_rss = statistics.median(r["peak_rss"] for r in results.get("peft", [{"peak_rss": float("nan")}]))
    print("| variant | tokens/s | vs PEFT | peak RSS (GB) | vs PEFT | trainable parameters |")
    print("|---|---|---|---|---|---|")
    for variant, runs in results.items():
        tps, rss = statistics.median(r["tokens_per_s"] for r in runs), statistics.median(r["peak_rss"] for r in runs)
        share = f"{runs[0]['trainable']:,} ({100 * runs[0]['trainable'] / runs[0]['total']:.2f}%)"
        print(f"| {variant} | {tps:.0f} | {tps / peft:.2f}x | {rss / 1e9:.2f} | {rss / peft_rss:.2f}x | {share} |")


if __name__ == "__main__":
    main()
