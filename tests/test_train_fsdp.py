"""`loractl train --fsdp`: two gloo processes sharding tiny-llama train the same adapter as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from loractl.formats import load_adapter

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    """A short all-linear run on tiny-llama with eval; the --json summary."""
    fixtures = ROOT / "fixtures"
    cmd = [sys.executable, "-m", "loractl", "train", "--base", str(fixtures / "tiny-llama"),
           "--data", str(fixtures / "data" / "train.jsonl"), "--eval-data", str(fixtures / "data" / "eval.jsonl"),
           "-o", str(tmp_path / name), "--targets", "all-linear", "--rank", "4", "--lr", "1e-2", "--steps", "3",
           "--max-len", "64", "--json", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    one = _train(tmp_path, "one", "--batch-size", "4")
    _train(tmp_path, "ddp", "--batch-size", "2", "--nproc", "2")
    two = _train(tmp_path, "two", "--batch-size", "2", "--nproc", "2", "--fsdp")
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    a, d, b = (load_adapter(tmp_path / name) for name in ("one", "ddp", "two"))
    assert set(a.modules) == set(b.modules) and len(a.modules) == 14  # 7 linear layers × 2 decoder layers
    for name, module in a.modules.items():
        # Adam turns float noise in a near-zero gradient into up to ~lr/100 of A (one process vs two, DDP too).
        torch.testing.assert_close(b.modules[name].A, module.A, rtol=1e-4, atol=5e-4)
        torch.testing.assert_close(b.modules[name].B, module.B, rtol=1e-4, atol=1e-5)
        for role in ("A", "B"):  # as DDP, up to float noise that Adam scales up in near-zero gradients (see above)
            ours, ddp = getattr(b.modules[name], role), getattr(d.modules[name], role)
            assert float((ours - ddp).norm()) <= 5e-4 * float(ddp.norm()), (name, role)
        assert b.modules[name].scale == module.scale
    assert b.meta.base_fingerprint == a.meta.base_fingerprint  # hashed unit by unit, never the whole base at once
    assert any(m.B.abs().sum() > 0 for m in b.modules.values())  # it did train


def test_fsdp_needs_a_distributed_launch(fixtures_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("train", "--base", fixtures_dir / "tiny-llama", "--data",
                           fixtures_dir / "data" / "train.jsonl", "-o", tmp_path / "out", "--fsdp")  # fmt: skip
    assert code == 2 and "--fsdp needs a distributed launch" in err and "--nproc" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [("--precision", "fp16"), ("--quantize", "nf4")])
def test_fsdp_refuses_what_it_cannot_do(fixtures_dir: Path, tmp_path: Path, flags: tuple[str, str]) -> None:
    code, _, err = run_cli("train", "--base", fixtures_dir / "tiny-llama", "--data",
                           fixtures_dir / "data" / "train.jsonl", "-o", tmp_path / "out", "--fsdp", *flags)  # fmt: skip
    assert code == 2 and "--fsdp" in err and flags[0].strip("-") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fsdp_checkpoint_stop_and_resume_continue_exactly(tmp_path: Path) -> None:
    """Each rank writes its shard (DCP); a run stopped at step 2 and resumed gives the straight run's adapter."""
    common = ("--batch-size", "2", "--nproc", "2", "--fsdp", "--schedule", "constant", "--save-every", "2")
    straight = _train(tmp_path, "straight", *common, "--steps", "4")
    stopped = _train(tmp_path, "resumed", *common, "--steps", "2")
    step2 = tmp_path / "resumed.train" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in step2.iterdir()) == ["adapter", "sharded", "state.pt"]
    assert len(list((step2 / "sharded").glob("*.distcp"))) == 2  # one shard file per rank
    assert stopped["steps"] == 2
    resumed = _train(tmp_path, "resumed", *common, "--steps", "4", "--resume", str(step2))
    assert resumed["steps"] == 4 and resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    a, b = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "resumed")
    for name, module in a.modules.items():
        torch.testing.assert_close(b.modules[name].A, module.A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.modules[name].B, module.B, rtol=1e-6, atol=1e-7)
    assert b.meta.base_fingerprint == a.meta.base_fingerprint
