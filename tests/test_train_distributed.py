"""Two processes under torchrun (gloo, CPU) take the same steps as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = """
import sys
import torch
from torch import nn
from loractl.train import Example, TrainConfig, adapter_from_model, inject, schedule, train


class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj, self.head = nn.Embedding(24, 16), nn.Linear(16, 16), nn.Linear(16, 24)
        self.forwards = 0

    def forward(self, input_ids, attention_mask=None):
        self.forwards += 1
        h = torch.tanh(self.proj(self.emb(input_ids)))
        return self.head(h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1))


def run(batch_size, out, ragged=False):
    g = torch.Generator().manual_seed(3)
    longest = 40 if ragged else 10
    rows = [torch.randint(1, 24, (int(torch.randint(4, longest, (1,), generator=g)),), generator=g) for _ in range(9)]
    data = [Example(tuple(r.tolist()), tuple(r.tolist())) for r in rows]
    if ragged:  # chat-like rows (prompts unlabelled), every micro-batch cut into length groups
        schedule.GROUP_COST_TOKENS = 0
        data = [Example(e.input_ids, (-100,) * (len(e.labels) // 2) + e.labels[len(e.labels) // 2 :]) for e in data]
    config = TrainConfig(targets=("proj", "head"), rank=4, lr=5e-2, steps=6, batch_size=batch_size, grad_accum=2)
    model = ToyLM()
    inject(model, config)
    result = train(model, data, config)
    adapter = adapter_from_model(model)
    if out:
        torch.save({k: (m.A, m.B) for k, m in adapter.modules.items()} | {"loss": result.train_loss,
                   "forwards": model.forwards}, out)
    return adapter, result, model.forwards


if __name__ == "__main__":
    run(int(sys.argv[1]), sys.argv[2] if int(__import__("os").environ["RANK"]) == 0 else None, sys.argv[3] == "ragged")
"""


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    assert_two_processes_match_one(tmp_path, "even")


def test_two_gloo_processes_with_length_groups_match_one(tmp_path: Path) -> None:
    """Ragged rows cut into length groups: each rank groups its own share of a micro-batch (a different number of
    forwards per rank), and the two ranks together still take the one-process steps."""
    assert_two_processes_match_one(tmp_path, "ragged")


def assert_two_processes_match_one(tmp_path: Path, rows: str) -> None:
    from loractl.train import schedule

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "2",
           str(tmp_path / "two.pt"), rows]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    namespace: dict[str, object] = {"__name__": "worker"}
    exec(compile(WORKER, "worker", "exec"), namespace)
    threads, cost = torch.get_num_threads(), schedule.GROUP_COST_TOKENS
    torch.set_num_threads(1)
    try:
        adapter, result, forwards = namespace["run"](4, None, rows == "ragged")  # type: ignore[operator]
    finally:
        torch.set_num_threads(threads)
        schedule.GROUP_COST_TOKENS = cost
    micro_batches = 6 * 2  # steps × grad_accum, on each rank
    assert (two["forwards"] > micro_batches and forwards > micro_batches) == (rows == "ragged")  # rows grouped
    assert two["loss"] == pytest.approx(result.train_loss, rel=1e-5)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(two[name][0], module.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[name][1], module.B, rtol=1e-5, atol=1e-6)
    assert any(module.B.abs().sum() > 0 for module in adapter.modules.values())  # it did train
