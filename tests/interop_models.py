"""PEFT adapters on real Hugging Face models, and their logits: the reference the consumers are held to.

The adapters are made by PEFT itself (`get_peft_model` + `save_pretrained`) with seeded random
A and B, so that neither the file nor the reference logits go through loractl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "The quick brown fox jumps over the lazy dog because"


def peft_adapter(
    model_dir: Path,
    out: Path,
    *,
    r: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    seed: int = 0,
    std: float = 0.02,
    **config: Any,
) -> Any:
    """Save a PEFT LoRA with random A and B (std `std`) on `model_dir` to `out`; return the PeftModel."""  # fmt: skip
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config)
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


def tokens(model_dir: Path, text: str = PROMPT) -> list[int]:
    """The prompt's token ids under the model's own tokenizer (BOS included when it adds one)."""
    from transformers import AutoTokenizer

    ids: list[int] = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    return ids


def logits(model: Any, ids: list[int], *, adapter: bool = True) -> torch.Tensor:
    """Float64 logits (tokens, vocab) of a PeftModel on `ids`, with or without its adapter."""
    with torch.no_grad():
        if adapter:
            out = model(input_ids=torch.tensor([ids])).logits[0]
        else:
            with model.disable_adapter():
                out = model(input_ids=torch.tensor([ids])).logits[0]
    return out.double()


def rel(a: Any, b: Any) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm())


def tiny_gpt2(root: Path, *, hub_layout: bool = False) -> tuple[Path, Any]:
    """A 2-layer random GPT-2 in `root/base` and PEFT's LoRA on its Conv1D layers (`fan_in_fan_out`) in `root/peft`.

    `hub_layout`: the base saved as the Hub's gpt2 is (GPT2Model's `h.0…` keys, `n_ctx`), which mlx-lm reads.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    (model.transformer if hub_layout else model).save_pretrained(root / "base")
    if hub_layout:
        doc = json.loads((root / "base" / "config.json").read_text())
        (root / "base" / "config.json").write_text(json.dumps(doc | {"n_ctx": 32}))
    peft_model = peft_adapter(root / "base", root / "peft", targets=("c_attn", "c_proj"), fan_in_fan_out=True, std=0.1)
    return root / "base", peft_model
