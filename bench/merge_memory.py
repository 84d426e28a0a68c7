"""Peak memory of `loractl merge` into a base bigger than 512 MB, for every kind of base (issue 24's goal:
≤ 512 MB whatever the base's size).

    PYTHONPATH=. python bench/merge_memory.py [--rows 32768] [--cols 4096] [--kinds gguf-q4k,gguf-f16,…] [--keep]

Each base is built synthetically, a block of rows at a time (never a float32 copy of it): one adapted
weight of `--rows` × `--cols` (32768 × 4096: 134 M values, 537 MB as float32, so a merge holding it
whole in float32 could not stay under 512 MB) beside an untouched tensor that takes the file past 512 MB.
The kinds: a GGUF in Q4_K and in F16, a split GGUF (two F16 shards), bitsandbytes nf4 (written
dequantized, the default) and FP8 with 128×128 block scales (kept), a bf16 safetensors directory, and
an SD 1.x single file (the test suite's tiny one, two attention weights made `--rows` × `--cols` fp16).
The adapter is a rank-16 LoRA on that weight. Each merge runs in its own child process (`python -m
loractl merge`, the CLI, imports included); its peak RSS is the child's own (`os.wait4`), and this
driver never imports torch. Build and merge times are printed beside it, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("gguf-q4k", "gguf-f16", "gguf-split", "bnb-nf4", "fp8", "safetensors", "sd-single-file")
BUILD = r"""
import json, struct, sys
from pathlib import Path
import numpy as np
import torch

kind, root, rows, cols = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
STEP = 1024  # rows per generated block
rng = np.random.default_rng(0)
MODULE = "model.layers.0.mlp.up_proj"


def floats(n):
    return (rng.standard_normal((n, cols), dtype=np.float32) * 0.02)


def gguf_file(path, tensors, kv):
    # tensors: (name, shape numpy order, ggml type id, bytes per row, rows generator)
    def s(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, v in kv.items():
        head += s(k) + (struct.pack("<I", 8) + s(v) if isinstance(v, str) else struct.pack("<II", 4, v))
    offset = 0
    for name, shape, type_id, row_bytes, _ in tensors:
        head += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        head += struct.pack("<IQ", type_id, offset)
        offset += -(-(row_bytes * shape[0]) // 32) * 32
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % 32))
        for name, shape, type_id, row_bytes, gen in tensors:
            n = 0
            for block in gen():
                f.write(block)
                n += len(block)
            f.write(b"\0" * (-n % 32))


def q4k_rows():
    from loractl.bases import ggml_quant
    for a in range(0, rows, STEP):
        yield ggml_quant.quantize(floats(min(STEP, rows - a)), "Q4_K")


def f16_rows(n=rows):
    for a in range(0, n, STEP):
        yield floats(min(STEP, n - a)).astype(np.float16).tobytes()


def zeros(n, row_bytes):
    for a in range(0, n, STEP):
        yield bytes(min(STEP, n - a) * row_bytes)


LLAMA = {"general.architecture": "llama", "llama.block_count": 1, "llama.attention.head_count": 32,
         "llama.attention.head_count_kv": 8, "llama.embedding_length": cols}
pad_rows = 65536  # an untouched F16 tensor of 65536 x cols: 512 MB at 4096 columns
if kind == "gguf-q4k":
    from loractl.bases import ggml_quant
    size = ggml_quant.row_size("Q4_K", cols)
    gguf_file(root / "base.gguf", [("blk.0.ffn_up.weight", (rows, cols), 12, size, q4k_rows),
                                   ("token_embd.weight", (pad_rows, cols), 1, 2 * cols, lambda: zeros(pad_rows, 2 * cols))], LLAMA)
elif kind == "gguf-f16":
    gguf_file(root / "base.gguf", [("blk.0.ffn_up.weight", (rows, cols), 1, 2 * cols, f16_rows),
                                   ("token_embd.weight", (pad_rows // 2, cols), 1, 2 * cols, lambda: zeros(pad_rows // 2, 2 * cols))], LLAMA)
elif kind == "gguf-split":
    for i, (name, gen) in enumerate([("blk.0.ffn_up.weight", f16_rows), ("token_embd.weight", lambda: zeros(rows, 2 * cols))]):
        kv = {**LLAMA, "split.no": i, "split.count": 2, "split.tensors.count": 2} if i == 0 else {"split.no": i, "split.count": 2, "split.tensors.count": 2}
        gguf_file(root / f"base-{i + 1:05d}-of-00002.gguf", [(name, (rows, cols), 1, 2 * cols, gen)], kv)
elif kind == "sd-single-file":  # the test suite's tiny SD 1.x with two attention weights made big
    from loractl.bases.sd_single_file import SingleFileBase
    from loractl.io.checkpoint import Checkpoint
    from loractl.io.safetensors_writer import StreamWriter, TensorSpec
    from tests.sd_pipelines import tiny_sd
    (root / "tiny").mkdir()
    ckpt = Checkpoint(tiny_sd("sd1", root / "tiny").single_file)
    attn = [n for n in ckpt.names if n.endswith(("attn1.to_q.weight", "attn1.to_k.weight"))][:2]
    big = {n: (rows, cols) for n in attn}
    specs = [TensorSpec(n, "F16" if n in big else ckpt.info(n).dtype, big.get(n, ckpt.info(n).shape)) for n in ckpt.names]
    writer = StreamWriter(root / "base.safetensors", specs, {"format": "pt"})
    for spec in writer.order:
        if spec.name in big:
            writer.write(spec.name, ((torch.from_numpy(floats(min(STEP, rows - a))).half(), None) for a in range(0, rows, STEP)))
        else:
            writer.write(spec.name, ckpt.get(spec.name))
    writer.close()
    ckpt.close()
    import shutil
    shutil.rmtree(root / "tiny")
    sd = SingleFileBase(root / "base.safetensors")
    MODULE = next(n for n, src in sd.names.items() if src.key == attn[0]).removesuffix(".weight")
    sd.close()
else:
    from loractl.io.safetensors_writer import StreamWriter, TensorSpec
    base = root / "base"
    base.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    specs, producers = [], {}
    w = MODULE + ".weight"
    def bf16_blocks(n):
        for a in range(0, n, STEP):
            yield torch.from_numpy(floats(min(STEP, n - a))).to(torch.bfloat16), None
    specs.append(TensorSpec("model.embed_tokens.weight", "BF16", (pad_rows, cols)))
    producers["model.embed_tokens.weight"] = lambda: (
        (torch.zeros(min(STEP, pad_rows - a), cols, dtype=torch.bfloat16), None) for a in range(0, pad_rows, STEP))
    if kind == "safetensors":
        specs.append(TensorSpec(w, "BF16", (rows, cols)))
        producers[w] = lambda: bf16_blocks(rows)
    elif kind == "fp8":
        scales = torch.empty(rows // 128, cols // 128)
        def fp8_blocks():
            for a in range(0, rows, STEP):
                v = torch.from_numpy(floats(min(STEP, rows - a)))
                blk = v.view(-1, 128, cols // 128, 128)
                amax = blk.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4)
                scales[a // 128 : a // 128 + v.shape[0] // 128] = (amax / 448).view(-1, cols // 128)
                yield (blk * (448 / amax)).to(torch.float8_e4m3fn).view(v.shape), None
        specs += [TensorSpec(w, "F8_E4M3", (rows, cols)), TensorSpec(w + "_scale_inv", "F32", (rows // 128, cols // 128))]
        producers[w] = fp8_blocks
        producers[w + "_scale_inv"] = lambda: iter([(scales, None)])
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    elif kind == "bnb-nf4":
        import bitsandbytes.functional as F
        absmax = torch.empty(rows * cols // 64)
        def nf4_blocks():
            for a in range(0, rows, STEP):
                v = torch.from_numpy(floats(min(STEP, rows - a))).to(torch.bfloat16)
                packed, qs = F.quantize_4bit(v, blocksize=64, quant_type="nf4", compress_statistics=False,
                                             quant_storage=torch.uint8)
                absmax[a * cols // 64 : (a + v.shape[0]) * cols // 64] = qs.absmax
                code_holder[0] = qs.code
                yield packed.reshape(-1, 1), None
        code_holder = [None]
        state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [rows, cols]}).encode()
        specs += [TensorSpec(w, "U8", (rows * cols // 2, 1)), TensorSpec(w + ".absmax", "F32", (rows * cols // 64,)),
                  TensorSpec(w + ".quant_map", "F32", (16,)),
                  TensorSpec(w + ".quant_state.bitsandbytes__nf4", "U8", (len(state),))]
        producers[w] = nf4_blocks
        producers[w + ".absmax"] = lambda: iter([(absmax, None)])
        producers[w + ".quant_map"] = lambda: iter([(code_holder[0].float(), None)])
        producers[w + ".quant_state.bitsandbytes__nf4"] = lambda: iter([(torch.frombuffer(bytearray(state), dtype=torch.uint8), None)])
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                         "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                                         "bnb_4bit_use_double_quant": False}
    writer = StreamWriter(base / "model.safetensors", specs, {"format": "pt"})
    order = [s.name for s in writer.order]
    if kind != "safetensors":  # the coded weight's blocks (not float32) first: they fill its scales / absmax
        early = list(producers[w]())
        producers[w] = lambda: iter(early)
    for name in order:
        writer.write(name, producers[name]())
    writer.close()
    (base / "config.json").write_text(json.dumps(config))

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.formats import save_adapter
g = torch.Generator().manual_seed(1)
a, b = torch.randn(16, cols, generator=g) / cols ** 0.5, torch.randn(rows, 16, generator=g) * 0.01
save_adapter(Adapter(modules={MODULE: LoraModule(A=a, B=b, scale=2.0, alpha=32.0)}, meta=AdapterMeta()),
             root / "lora", format="peft", force=True)
"""


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the child, its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    text = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    work = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=args.work))
    rows = []
    try:
        for kind in args.kinds.split(","):
            root = work / kind
            root.mkdir()
            build_s, _, _ = run([sys.executable, "-c", BUILD, kind, str(root), str(args.rows), str(args.cols)], env)
            base = next(p for p in sorted(root.iterdir()) if p.name.startswith("base"))
            out = root / ("merged.gguf" if base.suffix == ".gguf" else "merged")
            size = sum(
                p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name.startswith(("base", "model"))
            )
            load = Path("/proc/loadavg").read_text().split()[:3]
            wall, peak, text = run([sys.executable, "-m", "loractl", "merge", str(base), str(root / "lora"), "-o",
                                    str(out), "--json"], env)  # fmt: skip
            doc = json.loads(text[text.index("{") :])
            rows.append({"kind": kind, "base_bytes": size, "merged_tensor_float32_bytes": 4 * args.rows * args.cols,
                         "build_s": round(build_s, 1), "merge_s": round(wall, 1), "peak_rss_mb": round(peak),
                         "rounding_loss": doc.get("rounding_loss"), "load": load})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
