"""Hypothesis strategies and references for adapters on the tiny Llama fixture (GGUF, torchtune tests).

The reference permutations below are written independently of `loractl.formats._rope`, in the
form their projects use: llama.cpp's `LlamaModel.permute` (HF → Meta, convert_hf_to_gguf.py)
and torchtune's `_permute_lora_matrix` (Meta → HF, models/convert_weights.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

from loractl.adapter import Adapter, AdapterMeta, LoraModule

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 64, 128, 256, 4, 2
KV = HIDDEN // HEADS * KV_HEADS
SHAPES = {  # (out, in) of the tiny Llama's linear layers, by module leaf
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
LINEAR = [f"model.layers.{i}.{leaf}" for i in range(2) for leaf in SHAPES]


def llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in torch."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def torchtune_permute_lora(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """torchtune `_permute_lora_matrix` (Meta → HF rows of a q/k lora_b)."""
    rank = t.shape[-1]
    head_dim = t.shape[0] // n_heads
    return t.view(n_heads, head_dim // 2, 2, rank).transpose(1, 2).reshape((head_dim * n_heads), rank)


def module(out: int, inp: int, rank: int, alpha: float, rslora: bool, seed: int, **kw: object) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        A=torch.randn(rank, inp, generator=g),
        B=torch.randn(out, rank, generator=g),
        scale=alpha / (math.sqrt(rank) if rslora else rank),
        alpha=alpha,
        scale_rule="alpha/sqrt(r)" if rslora else "alpha/r",
        **kw,  # type: ignore[arg-type]
    )


@st.composite
def llama_adapters(draw: st.DrawFn, embedding: bool = False, lm_head: bool = False) -> Adapter:
    """Adapters on a random subset of the tiny Llama's modules: mixed ranks, per-module alphas, rsLoRA."""
    names = draw(st.lists(st.sampled_from(LINEAR), min_size=1, max_size=6, unique=True))
    rslora = draw(st.booleans())
    alphas = st.sampled_from([1.0, 8.0, 16.0, 3.0, 0.5, 20.0])
    modules = {}
    for i, name in enumerate(names):
        out, inp = SHAPES[name.split(".", 3)[3]]
        modules[name] = module(out, inp, draw(st.integers(1, 6)), draw(alphas), rslora, seed=i)
    if lm_head and draw(st.booleans()):
        modules["lm_head"] = module(VOCAB, HIDDEN, draw(st.integers(1, 6)), draw(alphas), rslora, seed=99)
    if embedding and draw(st.booleans()):
        modules["model.embed_tokens"] = module(
            HIDDEN, VOCAB, draw(st.integers(1, 6)), draw(alphas), rslora, seed=98, kind="embedding"
        )
    return Adapter(modules=modules, meta=AdapterMeta(base_model="tiny-llama"))


def assert_same_delta(source: Adapter, back: Adapter, rtol: float = 1e-6) -> None:
    """Every module's ΔW survives, to float32 rounding, relative to its norm."""
    assert set(back.modules) == set(source.modules)
    for name, m in source.modules.items():
        expected = m.delta_weight(torch.float64)
        got = back.modules[name].delta_weight(torch.float64)
        assert got.shape == expected.shape, name
        err = (got - expected).norm() / expected.norm()
        assert err <= rtol, f"{name}: relative error {err:.3g}"


def write_gguf_model(path: Path, tensors: Iterable[tuple[str, Any, str]], arch: str = "llama") -> Path:
    """A GGUF model of the tiny Llama's shape (2 blocks, its head counts): each (GGUF name, float32 values,
    GGML type name) quantized by gguf-py into that type; values of another dtype are taken as raw bytes."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_embedding_length(HIDDEN)
    for name, values, kind in tensors:
        qtype = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(values, qtype) if values.dtype.name == "float32" else values
        w.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
