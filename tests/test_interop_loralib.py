"""loralib (microsoft/LoRA, the paper's package) judges loractl's loralib files and writes files loractl reads
(issue 13 item 4)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_module, run_cli
from interop_models import rel
from oracles import oracle

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.formats import load_adapter, save_adapter
from loractl.formats.options import WriteOptions
from loractl.io.safetensors_writer import save_tensors

pytestmark = pytest.mark.interop
HIDDEN, VOCAB, ALPHA = 16, 50, 8


@pytest.fixture(scope="module")
def lora() -> Any:
    return oracle("loralib", "loralib")


def _net(lora: Any, r: int) -> torch.nn.Module:
    """A GPT-2-shaped block of loralib layers: embedding, fused qkv (Conv1D layout, q and v adapted), MLP."""
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.wte = lora.Embedding(VOCAB, HIDDEN, r=r, lora_alpha=ALPHA)
    net.c_attn = lora.MergedLinear(
        HIDDEN, 3 * HIDDEN, r=r, lora_alpha=ALPHA, enable_lora=[True, False, True], fan_in_fan_out=True
    )
    net.fc = lora.Linear(3 * HIDDEN, HIDDEN, r=r, lora_alpha=ALPHA)
    net.head = torch.nn.Linear(HIDDEN, 3)
    return net


def _forward(net: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return net.head(net.fc(net.c_attn(net.wte(ids))))


def test_loralib_layers_load_loractl_file(lora: Any, tmp_path: Path) -> None:
    """`--to loralib` → `load_state_dict(strict=False)` into loralib.Linear/Embedding: W + scale·B·A by hand."""
    r = 4
    net = _net(lora, r)
    fc = random_module(HIDDEN, 3 * HIDDEN, r, alpha=ALPHA, seed=1)
    emb = random_module(HIDDEN, VOCAB, r, alpha=2.0, seed=2)  # another alpha: folded into B for the file's one
    adapter = Adapter(
        modules={"fc": fc, "wte": LoraModule(A=emb.A, B=emb.B, scale=emb.scale, alpha=emb.alpha, kind="embedding")},
        meta=AdapterMeta(),
    )
    out = save_adapter(adapter, tmp_path / "lora.pt", format="loralib", options=WriteOptions(alpha=ALPHA))

    expected = copy.deepcopy(net)
    with torch.no_grad():
        expected.fc.weight += fc.scale * fc.B @ fc.A
        expected.wte.weight += (emb.scale * emb.B @ emb.A).T
    stored = torch.load(out, weights_only=True)
    missing, unexpected = net.load_state_dict(stored["model_state_dict"], strict=False)
    assert not unexpected and all("lora_" not in k for k in missing if not k.startswith("c_attn"))
    ids = torch.arange(VOCAB).reshape(5, 10)
    for mode in ("train", "eval"):  # unmerged forward, then loralib's own merge into the weights
        getattr(net, mode)(), getattr(expected, mode)()
        with torch.no_grad():
            before = _forward(expected, ids)
            assert rel(_forward(net, ids), before) < 1e-5, mode


def test_loralib_training_checkpoint_converts_to_peft(lora: Any, tmp_path: Path) -> None:
    """Three Adam steps on loralib layers; `lora_state_dict` → loractl → PEFT gives loralib's merged ΔW."""
    r = 2
    net = _net(lora, r)
    lora.mark_only_lora_as_trainable(net)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (4, 6), generator=g)
        loss = _forward(net, ids).square().mean()
        opt.zero_grad(), loss.backward(), opt.step()
    torch.save(lora.lora_state_dict(net), tmp_path / "lora.bin")
    base = {k: v.detach().clone() for k, v in net.state_dict().items() if "lora_" not in k}
    (tmp_path / "base").mkdir()
    save_tensors(tmp_path / "base" / "model.safetensors", base)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))

    code, _, err = run_cli(
        "convert", tmp_path / "lora.bin", "--to", "peft", "--alpha", ALPHA, "--allow-pickle",
        "--base", tmp_path / "base", "-o", tmp_path / "peft",
    )  # fmt: skip
    assert code == 0, err
    back = load_adapter(tmp_path / "peft")
    net.eval()  # loralib merges scale·B·A into each weight
    merged = net.state_dict()
    assert set(back.modules) == {"wte", "c_attn", "fc"}
    for name, m in back.modules.items():
        delta = (merged[f"{name}.weight"] - base[f"{name}.weight"]).double()
        assert rel(delta, base[f"{name}.weight"]) > 1e-3, name  # training moved it
        assert rel(m.delta_weight(torch.float64), delta) < 1e-4, name  # merged weight's float32 rounding / ΔW
