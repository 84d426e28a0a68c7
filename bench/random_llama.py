"""A random Llama of any shape (up to 7 B on a 24 GB machine), never materialised in float32.

The model is built on the meta device and cast there (free) to its target dtype; each tensor is then
drawn in that dtype from a generator seeded by its name. So building in-process costs the model plus
one layer, saving costs one tensor (the model never exists: `write_sharded` asks for each tensor just
before writing it), and the built model equals the saved one bit for bit, whichever path a benchmark takes.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from loractl.io.atomic import atomic_output
from loractl.io.checkpoint_writer import write_sharded
from loractl.io.safetensors_writer import TensorSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TOKENIZER_WORDS = 1000  # a word-level tokenizer, so that `loractl train` can read text for a random model


def llama_config(shape: dict[str, int], dtype: torch.dtype, max_positions: int = 2048) -> Any:
    """transformers' LlamaConfig for `shape` (hidden, intermediate, layers, heads, kv_heads, vocab); untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=max_positions,
                       tie_word_embeddings=False, dtype=dtype)  # fmt: skip


def meta_model(config: Any, dtype: torch.dtype) -> Any:
    """The model's structure on the meta device, in `dtype` (transformers builds it in float32 otherwise)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config).to(dtype)


def init_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The value of parameter `name`: RMSNorm weights 1, matrices N(0, 0.02²) drawn in `dtype` from a name-seeded generator."""
    out = torch.empty(shape, dtype=dtype) if out is None else out
    if len(shape) == 1:
        return out.fill_(1.0)
    return out.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def build_model(config: Any, dtype: torch.dtype, quantize: str | None = None, device: str = "cpu") -> Any:
    """The random model in memory, one unit (embeddings, norm, head, each decoder layer) materialised at a time.

    With `quantize` each decoder layer's linears become bitsandbytes layers as soon as the layer exists, so
    the unquantized copy is never whole. Each unit is drawn on the CPU (the same values on any machine) and
    then moved to `device`, where bitsandbytes quantizes it (on a GPU, with its CUDA kernel).
    """
    model = meta_model(config, dtype)
    units = [("model.embed_tokens", model.model.embed_tokens), ("model.norm", model.model.norm),
             ("lm_head", model.lm_head), *((f"model.layers.{i}", u) for i, u in enumerate(model.model.layers))]  # fmt: skip
    for prefix, unit in units:
        unit.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in unit.named_parameters(prefix=prefix):
                init_value(name, tuple(p.shape), dtype, out=p.data)
        if quantize and prefix.startswith("model.layers."):
            _quantize_linears(unit, dtype, quantize, device)
        unit.to(device)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its float32 buffers
    return model


def save_model(config: Any, dtype: torch.dtype, out: Path, shard_bytes: int = 2 * 10**9) -> None:
    """Write the random model as a transformers checkpoint (sharded safetensors, config, a word-level tokenizer)."""
    shapes = {name: tuple(p.shape) for name, p in meta_model(config, dtype).named_parameters()}
    specs = [TensorSpec(name, _CODES[dtype], shape) for name, shape in shapes.items()]
    with atomic_output(out) as tmp:
        write_sharded(tmp, specs, lambda name: init_value(name, shapes[name], dtype), shard_bytes)
        config.save_pretrained(tmp)
        word_tokenizer().save_pretrained(tmp)


def word_tokenizer() -> Any:
    """A whitespace word-level tokenizer over `w3` … `w999` (ids 3–999): text for a model with random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, _TOKENIZER_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def _quantize_linears(unit: Any, dtype: torch.dtype, quantize: str, device: str = "cpu") -> None:
    for name, linear in list(unit.named_modules()):
        if isinstance(linear, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(unit.get_submodule(parent), leaf, _quantized(linear, dtype, quantize, device))


def _quantized(linear: Any, dtype: torch.dtype, quantize: str, device: str = "cpu") -> Any:
    """bitsandbytes' layer holding `linear`'s weight, as transformers' BitsAndBytesConfig loads it."""
    import bitsandbytes as bnb

    if quantize == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                  quant_type=quantize)  # fmt: skip
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quantize)
    return layer.to(device)  # quantizes the weight there
