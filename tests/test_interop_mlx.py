"""mlx-lm judges loractl's mlx adapters, and loractl reads what mlx-lm trains (issue 13 item 2).

mlx-lm runs on MLX's CPU build (`mlx-cpu`) on Linux: `mlx_lm.load(base, adapter_path=...)` for
logits, `python -m mlx_lm lora` for training and `python -m mlx_lm fuse` for merging.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_module, run_cli
from interop_models import logits, rel, tiny_gpt2, tokens
from oracles import oracle

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.formats import save_adapter

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def mlx_lm() -> Any:
    oracle("mlx.core", "mlx[cpu]")
    return oracle("mlx_lm", "mlx-lm")


def _mlx_logits(mlx_lm: Any, model: Path, ids: list[int], adapter: Path | None = None) -> torch.Tensor:
    import mlx.core as mx

    net, _ = mlx_lm.load(str(model), adapter_path=str(adapter) if adapter else None)
    out = net(mx.array([ids]))[0].astype(mx.float32)
    return torch.from_numpy(np.array(out)).double()


@pytest.fixture(scope="module")
def mlx_adapter(smollm2: Path, smollm2_lora: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlx") / "adapter"
    code, _, err = run_cli("convert", smollm2_lora[0], "--to", "mlx", "--base", smollm2, "-o", out)
    assert code == 0, err
    return out


def test_mlx_lm_runs_loractl_adapter_like_peft(
    mlx_lm: Any, smollm2: Path, smollm2_lora: tuple[Path, Any], mlx_adapter: Path
) -> None:
    peft_model = smollm2_lora[1]
    ids = tokens(smollm2)
    hf_base, hf_lora = logits(peft_model, ids, adapter=False), logits(peft_model, ids)
    mlx_base, mlx_lora = _mlx_logits(mlx_lm, smollm2, ids), _mlx_logits(mlx_lm, smollm2, ids, mlx_adapter)

    base_error = rel(mlx_base, hf_base)  # mlx's float32 arithmetic: ~3e-6
    assert base_error < 1e-4
    assert rel(mlx_lora, hf_lora) <= 2 * base_error  # measured 3.7e-6
    assert rel(mlx_lora - mlx_base, hf_lora - hf_base) < 1e-2  # measured 1.3e-4


def _mlx_lm_cli(*args: str | Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mlx_lm", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_adapter_mlx_lm_trained_converts_to_peft(mlx_lm: Any, fixtures_dir: Path, tmp_path: Path) -> None:
    """Four steps of `mlx_lm lora` on the tiny Llama; PEFT with loractl's conversion gives mlx-lm's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = fixtures_dir / "tiny-llama"
    data = tmp_path / "data"
    data.mkdir()
    lines = "".join(
        json.dumps({"text": f"Example {i}: the fox jumps over the dog {i} times."}) + "\n" for i in range(4)
    )
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(lines)
    trained = tmp_path / "trained"
    _mlx_lm_cli(
        "lora", "--model", base, "--train", "--data", data, "--iters", 4, "--batch-size", 1, "--num-layers", 2,
        "--learning-rate", 1e-2, "--steps-per-eval", 100, "--val-batches", 1, "--max-seq-length", 32,
        "--adapter-path", trained, "--seed", 0,
    )  # fmt: skip
    code, _, err = run_cli("convert", trained, "--to", "peft", "-o", tmp_path / "peft")
    assert code == 0, err

    ids = tokens(base, "the fox jumps over the dog")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft").eval()
    hf_base, hf_lora = logits(model, ids, adapter=False), logits(model, ids)
    mlx_base, mlx_lora = _mlx_logits(mlx_lm, base, ids), _mlx_logits(mlx_lm, base, ids, trained)
    assert rel(mlx_lora - mlx_base, mlx_base) > 1e-3  # training moved something
    assert rel(hf_lora, mlx_lora) <= 2 * max(rel(hf_base, mlx_base), 1e-7)
    assert rel(hf_lora - hf_base, mlx_lora - mlx_base) < 1e-3


def test_loractl_merge_is_mlx_lm_fuse(mlx_lm: Any, smollm2: Path, mlx_adapter: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _mlx_lm_cli("fuse", "--model", smollm2, "--adapter-path", mlx_adapter, "--save-path", tmp_path / "fused")
    code, _, err = run_cli("merge", smollm2, mlx_adapter, "-o", tmp_path / "merged")
    assert code == 0, err
    fused = {}
    for shard in sorted((tmp_path / "fused").glob("*.safetensors")):
        fused |= load_file(shard)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(smollm2 / "model.safetensors")

    assert fused.keys() == merged.keys()
    changed = 0
    for name, ours in merged.items():
        assert fused[name].dtype == ours.dtype, name
        assert rel(fused[name], ours) < 1e-6, name  # float32 rounding of W + ΔW (measured ≤ 7e-9)
        changed += not torch.equal(ours, base[name])
    assert changed == 210  # 30 layers × 7 projections


def test_mlx_lm_loads_a_gpt2_adapter_like_peft(mlx_lm: Any, tmp_path: Path) -> None:
    """GPT-2's transformers names (`transformer.h.N`, Conv1D) become mlx-lm's (`model.h.N`, Linear): mlx-lm's own
    loader takes the file and gives PEFT's logits; the file under transformers' names is what it refused."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    base, peft_model = tiny_gpt2(tmp_path, hub_layout=True)
    code, _, err = run_cli("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    assert code == 0, err

    def mlx_logits(adapter: Path | None) -> torch.Tensor:
        net, _ = load_model(base)
        if adapter is not None:
            net = load_adapters(net, str(adapter))
        return torch.from_numpy(np.array(net(mx.array([ids]))[0].astype(mx.float32))).double()

    ids = list(range(3, 15))
    hf_base, hf_lora = logits(peft_model, ids, adapter=False), logits(peft_model, ids)
    mlx_base, mlx_lora = mlx_logits(None), mlx_logits(tmp_path / "mlx")
    assert rel(mlx_base, hf_base) < 1e-5
    assert rel(mlx_lora - mlx_base, hf_lora - hf_base) < 1e-4  # the adapter's own effect, as PEFT applies it
    assert rel(hf_lora - hf_base, hf_base) > 1e-3  # and it has one

    weights = mx.load(str(tmp_path / "mlx" / "adapters.safetensors"))
    mx.save_safetensors(str(tmp_path / "mlx" / "adapters.safetensors"),
                        {k.replace("model.", "transformer.", 1): v for k, v in weights.items()})  # fmt: skip
    with pytest.raises(ValueError, match="not an adapter parameter"):
        mlx_logits(tmp_path / "mlx")


_Q = "model.layers.1.self_attn.q_proj"
# What mlx-lm 0.32.2 says when an mlx adapter carries what each rule flags: its loader takes lora_a, lora_b
# and m only, and makes LoRA layers of Linear, SwitchLinear and Embedding only.
_MLX_SAYS = {
    "bias-dropped": "q_proj.lora_b.bias: not an adapter parameter in the model",
    "full-tensors-dropped": "model.norm.weight: not an adapter parameter in the model",
    "conv-unsupported": "Can't convert layer of type Conv1d to LoRA",
}


def _llama_case(code: str, base: Path, tmp_path: Path) -> tuple[Adapter, Callable[[], object]]:
    """A q_proj adapter with a lora_B bias or a full norm; loractl's mlx file of its LoRA part with that tensor
    added under the name mlx-lm would give it, and the mlx_lm.load that reads it."""
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    g = torch.Generator().manual_seed(5)
    plain = {_Q: random_module(64, 64, 2, seed=1)}
    if code == "bias-dropped":
        bias = torch.randn(64, generator=g)
        adapter = Adapter(modules={_Q: replace(plain[_Q], bias=bias)}, meta=AdapterMeta())
        extra = {f"{_Q}.lora_b.bias": mx.array(bias.numpy())}
    else:
        norm = torch.randn(64, generator=g)
        adapter = Adapter(modules=plain, full_tensors={"model.norm.weight": norm}, meta=AdapterMeta())
        extra = {"model.norm.weight": mx.array(norm.numpy())}
    mine = save_adapter(Adapter(modules=plain, meta=AdapterMeta()), tmp_path / "mlx", format="mlx")
    mlx_lm_load(str(base), adapter_path=str(mine))  # loads before the tensor is added
    weights = mine / "adapters.safetensors"
    mx.save_safetensors(str(weights), {**mx.load(str(weights)), **extra})
    return adapter, lambda: mlx_lm_load(str(base), adapter_path=str(mine))


def _mamba_conv_case(tmp_path: Path) -> tuple[Adapter, Callable[[], object]]:
    """A LoRA on Mamba's depthwise conv1d, and mlx-lm's own adapter loading of it into its Mamba model."""
    import mlx.core as mx
    from mlx_lm.models import mamba
    from mlx_lm.tuner.utils import load_adapters

    g = torch.Generator().manual_seed(6)
    conv = LoraModule(A=torch.randn(2, 1, 4, generator=g), B=torch.randn(32, 2, 1, generator=g), scale=1.0,
                      alpha=2.0, kind="conv")  # fmt: skip
    adapter = Adapter(modules={"backbone.layers.0.mixer.conv1d": conv}, meta=AdapterMeta())
    model = mamba.Model(mamba.ModelArgs(
        model_type="mamba", vocab_size=64, hidden_size=16, intermediate_size=32, state_size=4,
        num_hidden_layers=1, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=2,
    ))  # fmt: skip
    mine = tmp_path / "mlx"
    mine.mkdir()
    lora = {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": ["mixer.conv1d"]}
    (mine / "adapter_config.json").write_text(json.dumps({"num_layers": 1, "lora_parameters": lora}))
    lora_a = np.ascontiguousarray(conv.A.flatten(1).T.numpy())
    mx.save_safetensors(str(mine / "adapters.safetensors"), {"backbone.layers.0.mixer.conv1d.lora_a": mx.array(lora_a)})
    return adapter, lambda: load_adapters(model, str(mine))


@pytest.mark.parametrize("code", _MLX_SAYS)
def test_mlx_lm_refuses_what_validate_target_flags(mlx_lm: Any, code: str, fixtures_dir: Path, tmp_path: Path) -> None:
    """mlx-lm's adapter loader refuses each thing `validate --target mlx` flags (a lora_B bias, full tensors,
    LoRA on a convolution), and the validate finding names it with the rule's code."""
    from helpers import target_findings

    if code == "conv-unsupported":
        adapter, load = _mamba_conv_case(tmp_path)
    else:
        adapter, load = _llama_case(code, fixtures_dir / "tiny-llama", tmp_path)
    with pytest.raises(ValueError, match=re.escape(_MLX_SAYS[code])):
        load()
    flagged = target_findings(save_adapter(adapter, tmp_path / "peft", format="peft"), "mlx")
    assert code in flagged, flagged
    assert set(flagged[code]) == ({None} if adapter.full_tensors else set(adapter.modules)), flagged
