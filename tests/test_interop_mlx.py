"""mlx-lm judges loractl's mlx adapters, and loractl reads what mlx-lm trains (issue 13 item 2).

mlx-lm runs on MLX's CPU build (`mlx-cpu`) on Linux: `mlx_lm.load(base, adapter_path=...)` for
logits, `python -m mlx_lm lora` for training and `python -m mlx_lm fuse` for merging.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import run_cli
from interop_models import logits, rel, tokens
from oracles import oracle

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
