"""bench/random_llama.py, the 7 B benchmark's base: never float32, the same model built or saved.

The 7 B run itself is a benchmark (bench/train.py --preset 7b), not a test: these build small shapes through
the same functions, and the 7 B shape on the meta device only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from oracles import oracle
from torch.utils._python_dispatch import TorchDispatchMode

BENCH = Path(__file__).resolve().parent.parent / "bench"
SMALL = {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1000}


@pytest.fixture(scope="module")
def rl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("random_llama", BENCH / "random_llama.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["random_llama"] = module
    spec.loader.exec_module(module)
    return module


class Allocations(TorchDispatchMode):
    """Every tensor an aten op produces, as (op, dtype, device type, numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.dtype, t.device.type, t.numel()))
        return out


def test_build_never_allocates_float32_weights(rl: ModuleType) -> None:
    dtype = torch.bfloat16
    config = rl.llama_config(SMALL, dtype)
    with Allocations() as log:
        model = rl.build_model(config, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(p.device.type == "cpu" for p in model.parameters())
    smallest = min(p.numel() for p in model.parameters())  # a norm weight: hidden
    cpu_f32 = [e for e in log.seen if e[2] == "cpu" and e[1] == torch.float32 and e[3] >= smallest]
    assert cpu_f32 == []  # only the rotary buffers (head_dim / 2 values) are float32
    assert any(e[2] == "meta" for e in log.seen)  # the structure was built on the meta device
    assert sum(e[3] for e in log.seen if e[2] == "cpu" and e[1] == dtype) >= sum(p.numel() for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_7b_preset_is_6_7b_parameters_of_bf16_on_meta(rl: ModuleType) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from train import PRESETS  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(BENCH))
    model = rl.meta_model(rl.llama_config(PRESETS["7b"], torch.bfloat16), torch.bfloat16)
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    total = sum(p.numel() for p in params)
    assert total == 6_738_415_616  # docs/train.md#memory: 13.5 GB in bf16
    assert model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel() == 2 * 32000 * 4096


def test_saved_checkpoint_equals_built_model_and_loads_in_bf16(rl: ModuleType, tmp_path: Path) -> None:
    from loractl.io.checkpoint import Checkpoint
    from loractl.train.base import load_base

    dtype = torch.bfloat16
    config = rl.llama_config(SMALL, dtype)
    rl.save_model(config, dtype, tmp_path / "base", shard_bytes=200_000)  # several shards and an index
    assert len(list((tmp_path / "base").glob("model-*.safetensors"))) > 1
    with Checkpoint(tmp_path / "base") as checkpoint:
        assert {checkpoint.info(n).dtype for n in checkpoint.names} == {"BF16"}
    built = rl.build_model(config, dtype).state_dict()
    loaded, tokenizer = load_base(tmp_path / "base")  # the checkpoint's own dtype
    state = loaded.state_dict()
    assert state.keys() == built.keys()
    for name, value in built.items():
        assert state[name].dtype == dtype and torch.equal(state[name], value), name
    assert max(tokenizer.encode("w3 w999 w998")) < SMALL["vocab"]


def test_quantized_build_replaces_decoder_linears(rl: ModuleType) -> None:
    oracle("bitsandbytes", "bitsandbytes", "qlora")
    import bitsandbytes as bnb

    dtype = torch.bfloat16
    model = rl.build_model(rl.llama_config(SMALL, dtype), dtype, quantize="nf4")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) and isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert model.lm_head.weight.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules())
